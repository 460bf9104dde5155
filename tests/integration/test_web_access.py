"""The web interface's tables on SQLite and PostgreSQL: users, sessions, audit, study views."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support.records import analyse, receive
from triage_node.db.database import Database
from triage_node.db.priority import ReportSource
from triage_node.db.web_access import Role, UserExists

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def test_users_sessions_and_their_end(store: Database) -> None:
    access = store.web_access
    access.add_user("rita", "hash-1", Role.READER, T0)
    with pytest.raises(UserExists):
        access.add_user("rita", "hash-2", Role.ADMIN, T0)
    user = access.user("rita")
    assert user is not None and user.role is Role.READER and user.password_hash == "hash-1"
    access.open_session(user.id, "t" * 64, "csrf", T0)
    session = access.session("t" * 64)
    assert session is not None and session.user.username == "rita" and session.csrf_token == "csrf"
    assert access.session("x" * 64) is None
    access.touch_session(session.id, T0 + timedelta(minutes=5))
    assert access.session("t" * 64).last_seen_at == T0 + timedelta(minutes=5)  # type: ignore[union-attr]

    assert access.set_password("rita", "hash-3", T0) is True  # ends her sessions
    assert access.session("t" * 64) is None
    assert access.set_password("nobody", "hash", T0) is False

    access.open_session(user.id, "u" * 64, "csrf", T0)
    assert access.end_stale_sessions(T0 - timedelta(minutes=1), T0 - timedelta(hours=1)) == 0
    assert access.end_stale_sessions(T0 + timedelta(minutes=1), T0 - timedelta(hours=1)) == 1
    access.open_session(user.id, "v" * 64, "csrf", T0)
    assert access.remove_user("rita") is True
    assert access.session("v" * 64) is None and access.user("rita") is None
    assert access.remove_user("rita") is False


def test_audit_events_are_kept_newest_first(store: Database) -> None:
    access = store.web_access
    access.audit(T0, "rita", "sign_in", peer="10.0.0.5")
    access.audit(T0 + timedelta(seconds=1), "rita", "mark_reported", target="1.2.3", detail="x")
    events = access.audit_events()
    assert [e.action for e in events] == ["mark_reported", "sign_in"]
    assert events[0].target == "1.2.3" and events[1].peer == "10.0.0.5"
    access.audit(T0, "u" * 500, "a" * 100, detail="d" * 5000)  # cut to the columns, not refused
    assert len(access.audit_events(1)[0].username) <= 64


def test_worklist_and_study_facts(store: Database) -> None:
    receive(store, "1.7.1", T0)
    receive(store, "1.7.2", T0)
    analyse(store, T0 + timedelta(seconds=5), 0.9)
    receive(store, "1.7.3", T0 + timedelta(seconds=6))
    analyse(store, T0 + timedelta(seconds=10), 0.5)
    entries = store.study_view.worklist()
    assert [e.rank for e in entries] == list(range(1, len(entries) + 1))
    assert {e.study_uid for e in entries} == {"1.7.1", "1.7.2", "1.7.3"}
    assert all(e.body_part == "HAND" for e in entries)
    assert entries[0].score == pytest.approx(0.9)

    facts = store.study_view.facts("1.7.3")
    assert facts is not None and facts.body_parts == ("HAND",)
    assert facts.model_name and facts.inferred_at is not None and len(facts.images) == 1
    assert facts.images[0].probability == pytest.approx(0.5)
    assert store.study_view.facts("9.9.9") is None
    sop = facts.images[0].sop_instance_uid
    assert store.study_view.instance_path("1.7.3", sop) == facts.images[0].path
    assert store.study_view.instance_path("1.7.1", sop) is None  # not an instance of that study
    assert store.study_view.instance_path("1.7.3") == facts.images[0].path

    found = store.priority.mark_reported(
        ReportSource.WEB, T0 + timedelta(minutes=1), study_uid="1.7.3", reported_by="rita"
    )
    assert found == [("1.7.3", True)]
    assert store.study_view.facts("1.7.3").reported_by == "rita"  # type: ignore[union-attr]
    assert "1.7.3" not in {e.study_uid for e in store.study_view.worklist()}


def test_activity_by_hour(store: Database) -> None:
    receive(store, "1.6.1", T0)
    analyse(store, T0 + timedelta(seconds=30), 0.9)
    receive(store, "1.6.2", T0 + timedelta(hours=2))
    analyse(store, T0 + timedelta(hours=2, seconds=10), 0.01)
    hours = store.study_view.activity(T0 + timedelta(hours=3), hours=24)
    assert len(hours) == 24 and hours[-1].start == T0 + timedelta(hours=3)
    by_start = {h.start: h for h in hours}
    first, later = by_start[T0], by_start[T0 + timedelta(hours=2)]
    assert (first.received, first.analysed, first.flagged) == (1, 1, 1)
    assert first.mean_seconds_to_result == pytest.approx(30)
    assert (later.received, later.analysed) == (1, 1)
    assert sum(h.received for h in hours) == 2
