"""Sign-in, sessions and the lock-out of password guessing.

A session is a 256-bit random token in an HttpOnly, SameSite=Strict cookie; the database keeps
only its SHA-256, the signed-in user and the session's CSRF token. It ends at sign-out, after
``web.session_idle_minutes`` without a request, ``web.session_max_hours`` after sign-in, or
when the user's password changes or the user is removed.

Failed sign-ins are counted per user name and per source address; at ``web.login_attempts``
failures the name (or address) is locked for ``web.lockout_minutes``, doubling with each
further failure (up to a day). A locked name is refused even with the right password, so a
guesser learns nothing from the answer; the lock is in memory and ends with the process.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from triage_node.config import WebConfig
from triage_node.db.web_access import WebAccess, WebSession
from triage_node.logs import get_logger, log_event
from triage_node.web.passwords import hash_password, verify_password

LOG = get_logger(__name__)

COOKIE = "triage_session"
TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is written at most this often
MAX_LOCKOUT = timedelta(days=1)
MAX_USERNAME = 64


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class _Failures:
    count: int = 0
    locked_until: datetime | None = None


class LoginThrottle:
    """Failed sign-ins per key (a user name, a source address). Thread-safe."""

    def __init__(self, attempts: int, lockout: timedelta) -> None:
        self.attempts = attempts
        self.lockout = lockout
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def locked(self, keys: list[str], now: datetime) -> datetime | None:
        """When the latest lock on any of *keys* ends, or None when none is locked."""
        with self._lock:
            ends = [
                f.locked_until
                for key in keys
                if (f := self._failures.get(key)) is not None
                and f.locked_until is not None
                and f.locked_until > now
            ]
        return max(ends) if ends else None

    def failed(self, keys: list[str], now: datetime) -> None:
        with self._lock:
            for key in keys:
                failures = self._failures.setdefault(key, _Failures())
                over = failures.locked_until
                if over is not None and over <= now - self.lockout:
                    failures.count = 0  # a lock long over: start again
                    failures.locked_until = None
                failures.count += 1
                if failures.count >= self.attempts:
                    extra = failures.count - self.attempts
                    lock = min(self.lockout * (2 ** min(extra, 16)), MAX_LOCKOUT)
                    failures.locked_until = now + lock
            if len(self._failures) > 100_000:  # a flood of names: forget the ones not locked
                for key in [k for k, f in self._failures.items() if f.locked_until is None]:
                    del self._failures[key]

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


@dataclass(frozen=True)
class SignIn:
    """What a sign-in attempt came to: a session token, or a refusal to show."""

    token: str | None = None
    refusal: str = ""
    locked: bool = False


class Sessions:
    """Signs users in and out and finds the session of a request's cookie."""

    def __init__(self, access: WebAccess, config: WebConfig, clock: Callable[[], datetime]) -> None:
        self.access = access
        self.idle = timedelta(minutes=config.session_idle_minutes)
        self.longest = timedelta(hours=config.session_max_hours)
        self.throttle = LoginThrottle(
            config.login_attempts, timedelta(minutes=config.lockout_minutes)
        )
        self.clock = clock

    def sign_in(self, username: str, password: str, peer: str) -> SignIn:
        now = self.clock()
        username = username.strip()[:MAX_USERNAME]
        keys = [f"user:{username.casefold()}", f"address:{peer}"]
        until = self.throttle.locked(keys, now)
        if until is not None:
            minutes = max(1, round((until - now).total_seconds() / 60))
            self.access.audit(now, username, "sign_in_locked", peer=peer)
            log_event(
                LOG, logging.WARNING, "web_sign_in_locked", "sign-in refused: locked", peer=peer
            )
            return SignIn(
                refusal=f"Too many failed sign-ins. Try again in {minutes} minute(s).",
                locked=True,
            )
        user = self.access.user(username) if username else None
        matches, rehash = verify_password(None if user is None else user.password_hash, password)
        if user is None or not matches:
            self.throttle.failed(keys, now)
            self.access.audit(now, username, "sign_in_failed", peer=peer)
            log_event(LOG, logging.WARNING, "web_sign_in_failed", "sign-in failed", peer=peer)
            return SignIn(refusal="Wrong user name or password.")
        self.throttle.succeeded(keys)
        self.end_stale()  # sign-ins are rare: a good moment to forget ended sessions
        if rehash:
            self.access.rehash(user.id, hash_password(password))
        token = secrets.token_urlsafe(32)
        self.access.open_session(user.id, token_hash(token), secrets.token_urlsafe(32), now)
        self.access.audit(now, user.username, "sign_in", peer=peer)
        log_event(
            LOG, logging.INFO, "web_sign_in", "signed in", user=user.username, role=user.role.value
        )
        return SignIn(token=token)

    def find(self, token: str | None) -> WebSession | None:
        """The live session of a cookie's token, or None (and an expired one is ended)."""
        if not token or len(token) > 128:
            return None
        session = self.access.session(token_hash(token))
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen_at > self.idle or now - session.created_at > self.longest:
            self.access.end_session(session.id)
            return None
        if now - session.last_seen_at > TOUCH_EVERY:
            self.access.touch_session(session.id, now)
        return session

    def sign_out(self, session: WebSession, peer: str) -> None:
        self.access.end_session(session.id)
        self.access.audit(self.clock(), session.user.username, "sign_out", peer=peer)

    def end_stale(self) -> int:
        now = self.clock()
        return self.access.end_stale_sessions(now - self.idle, now - self.longest)
