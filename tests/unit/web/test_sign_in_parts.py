"""The parts of sign-in that need no server: passwords, the lock-out, the redirect guard,
the thumbnail cache and the chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from triage_node.db.study_view import HourOfActivity
from triage_node.web.app import WebApp, _chart
from triage_node.web.images import ThumbnailCache
from triage_node.web.passwords import hash_password, verify_password
from triage_node.web.sessions import LoginThrottle

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_passwords_are_argon2id_and_verified() -> None:
    hashed = hash_password("a long enough password")
    assert hashed.startswith("$argon2id$") and "a long enough" not in hashed
    assert verify_password(hashed, "a long enough password") == (True, False)
    assert verify_password(hashed, "a wrong password!!") == (False, False)
    assert verify_password(None, "a long enough password") == (False, False)  # no such user
    assert verify_password("not a hash", "anything at all") == (False, False)
    with pytest.raises(ValueError, match="at least"):
        hash_password("short")


def test_the_lock_out_starts_at_the_limit_and_doubles() -> None:
    throttle = LoginThrottle(attempts=3, lockout=timedelta(minutes=1))
    keys = ["user:rita", "address:10.0.0.5"]
    for _ in range(2):
        throttle.failed(keys, T0)
    assert throttle.locked(keys, T0) is None
    throttle.failed(keys, T0)
    assert throttle.locked(keys, T0) == T0 + timedelta(minutes=1)
    assert throttle.locked(["user:rita"], T0) is not None  # the name, from anywhere
    assert throttle.locked(["user:adam", "address:10.0.0.6"], T0) is None
    throttle.failed(keys, T0 + timedelta(seconds=10))  # one more: twice as long
    assert throttle.locked(keys, T0 + timedelta(seconds=10)) == T0 + timedelta(seconds=130)
    throttle.succeeded(keys)
    assert throttle.locked(keys, T0) is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/studies/1.2.3", "/studies/1.2.3"),
        ("/worklist?point=high_specificity", "/worklist?point=high_specificity"),
        ("//evil.example/", "/worklist"),
        ("https://evil.example/", "/worklist"),
        ("/\\evil.example", "/worklist"),
        ("", "/worklist"),
        (None, "/worklist"),
    ],
)
def test_sign_in_only_sends_you_on_within_the_site(given: str | None, expected: str) -> None:
    assert WebApp._next(given) == expected


def test_the_thumbnail_cache_keeps_the_recent_within_its_bytes() -> None:
    cache = ThumbnailCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # now the most recent
    cache.put("c", b"90ab")  # over 10 bytes: the least recent (b) goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


def test_the_chart_scales_to_its_highest_hour() -> None:
    hours = [
        HourOfActivity(T0 + timedelta(hours=h), h, h // 2, 0, None if h % 2 else 4.0)
        for h in range(24)
    ]
    chart = _chart(hours, width=230, height=100)
    assert chart.top == 23 and chart.top_wait == 4.0
    name, _, points = chart.series[0]
    assert name == "received" and points.split()[0] == "0.0,100.0"
    assert points.split()[-1] == "230.0,10.0"  # the highest hour at the top margin
    assert len(chart.wait_points.split()) == 12  # hours without a result are left out
