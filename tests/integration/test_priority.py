"""The priority table on SQLite and PostgreSQL: flags, ranks, reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support.records import analyse, receive
from triage_node.db.database import Database
from triage_node.db.priority import PriorityState, ReportSource
from triage_node.domain import Outcome

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
PACS = "PACS@127.0.0.1:4242"


def test_states_follow_the_data_path_and_positives_are_flagged(store: Database) -> None:
    receive(store, "1.9.1", T0)
    assert store.priority.row("1.9.1").state == PriorityState.RECEIVED  # type: ignore[union-attr]
    [ready] = store.intake.ready_studies(T0, timedelta(0), timedelta(hours=1))
    store.queue.enqueue(ready, T0)
    assert store.priority.row("1.9.1").state == PriorityState.QUEUED  # type: ignore[union-attr]
    receive(store, "1.9.2", T0)
    analyse(store, T0 + timedelta(seconds=5), 0.5)
    row = store.priority.row("1.9.1")
    assert row is not None
    assert row.state == PriorityState.FLAGGED and row.outcome == Outcome.POSITIVE
    assert row.score == pytest.approx(0.5) and row.operating_point == "high_sensitivity"
    assert row.flagged_at == T0 + timedelta(seconds=5) and row.rank in (1, 2)
    assert row.model_version == "2" and row.study_date == "20260101"

    receive(store, "1.9.3", T0)
    analyse(store, T0 + timedelta(seconds=6), 0.1)
    negative = store.priority.row("1.9.3")
    assert negative is not None and negative.state == PriorityState.INFERRED
    assert negative.outcome == Outcome.NEGATIVE and negative.flagged_at is None
    assert negative.rank is None and negative.operating_point is None
    assert store.priority.row("9.9.9") is None
    assert store.priority.counts() == {"FLAGGED": 2, "INFERRED": 1}
    assert negative.skip_reason is None

    receive(store, "1.9.4", T0)
    analyse(store, T0 + timedelta(seconds=7), None, "out of scope: Body Part Examined CHEST")
    skipped = store.priority.row("1.9.4")
    assert skipped is not None and skipped.outcome == Outcome.SKIPPED
    assert skipped.skip_reason == "out of scope: Body Part Examined CHEST"


def test_priority_only_goes_up(store: Database) -> None:
    receive(store, "1.8.1", T0)
    analyse(store, T0, 0.9)
    first = store.priority.row("1.8.1")
    assert first is not None and first.operating_point == "high_specificity"
    receive(store, "1.8.1", T0 + timedelta(minutes=1))  # a late image: re-analysed
    assert store.priority.row("1.8.1").state == PriorityState.FLAGGED  # type: ignore[union-attr]
    analyse(store, T0 + timedelta(minutes=2), 0.05)  # now the study looks negative
    again = store.priority.row("1.8.1")
    assert again is not None
    assert again.state == PriorityState.FLAGGED and again.outcome == Outcome.NEGATIVE
    assert again.score == pytest.approx(0.9) and again.operating_point == "high_specificity"
    assert again.flagged_at == first.flagged_at and again.rank == 1


def test_rank_is_higher_score_then_older_study(store: Database) -> None:
    for n, (minute, probability) in enumerate([(0, 0.5), (1, 0.95), (2, 0.5), (3, 0.2)]):
        receive(store, f"1.7.{n}", T0 + timedelta(minutes=minute))
        analyse(store, T0 + timedelta(minutes=minute, seconds=1), probability)
    worklist = store.priority.worklist()
    assert [(r.study_uid, r.rank) for r in worklist] == [("1.7.1", 1), ("1.7.0", 2), ("1.7.2", 3)]
    assert [store.priority.row(r.study_uid).rank for r in worklist] == [1, 2, 3]  # type: ignore[union-attr]


def test_mark_reported_by_uid_and_accession(store: Database) -> None:
    receive(store, "1.6.1", T0, accession="A-1")
    receive(store, "1.6.2", T0, accession="A-2")
    receive(store, "1.6.3", T0, accession="A-2")
    analyse(store, T0, 0.8)
    now = T0 + timedelta(hours=1)
    assert store.priority.mark_reported(ReportSource.CLI, now, study_uid="1.6.1") == [
        ("1.6.1", True)
    ]
    assert store.priority.mark_reported(ReportSource.HL7, now, study_uid="1.6.1") == [
        ("1.6.1", False)
    ]
    assert sorted(store.priority.mark_reported(ReportSource.HL7, now, accession_number="A-2")) == [
        ("1.6.2", True),
        ("1.6.3", True),
    ]
    assert store.priority.mark_reported(ReportSource.HL7, now, accession_number="nope") == []
    row = store.priority.row("1.6.1")
    assert row is not None and row.state == PriorityState.REPORTED
    assert row.report_source == ReportSource.CLI and row.reported_at == now and row.rank is None
    assert store.priority.worklist() == []
    # A report known before the analysis: the study never enters the worklist.
    receive(store, "1.6.4", T0)
    store.priority.mark_reported(ReportSource.HL7, now, study_uid="1.6.4")
    analyse(store, now, 0.99)
    assert store.priority.row("1.6.4").state == PriorityState.REPORTED  # type: ignore[union-attr]
    assert store.priority.worklist() == []
    with pytest.raises(ValueError):
        store.priority.mark_reported(ReportSource.CLI, now)
