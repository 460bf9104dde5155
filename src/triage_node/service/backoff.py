"""How long to wait before trying again after a failure: one exponential backoff for the
analysis queue (a failed job) and the outbox (a refused or unreachable destination)."""

from __future__ import annotations

import random
from datetime import timedelta


def exponential_backoff(
    first: float, attempt: int, *, cap: float | None = None, rng: random.Random | None = None
) -> timedelta:
    """The wait after the *attempt*-th failure (1, 2, ...): *first* seconds doubling with each
    attempt, at most *cap*; with *rng*, times 0.5-1.5 so that many retries do not fall due at
    the same moment."""
    seconds = first * 2 ** max(0, attempt - 1)
    if cap is not None:
        seconds = min(cap, seconds)
    if rng is not None:
        seconds *= rng.uniform(0.5, 1.5)
    return timedelta(seconds=seconds)
