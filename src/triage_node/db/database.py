"""One database: the shared engine and every aggregate over it, for the places that wire
components together (the service, ``status``, the CLI, tests)."""

from __future__ import annotations

from sqlalchemy import Engine

from triage_node.db.escalation import Escalations
from triage_node.db.intake import Intake
from triage_node.db.outbox import Outbox
from triage_node.db.priority import PriorityTable
from triage_node.db.processes import Processes
from triage_node.db.queue import JobQueue
from triage_node.db.report_checks import ReportChecks
from triage_node.db.retention import RetentionRecords
from triage_node.db.study_view import StudyView
from triage_node.db.web_access import WebAccess


class Database:
    """The aggregates of one engine. Components are given the aggregates they use, not this."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.intake = Intake(engine)
        self.queue = JobQueue(engine)
        self.outbox = Outbox(engine)
        self.priority = PriorityTable(engine)
        self.report_checks = ReportChecks(engine)
        self.escalations = Escalations(engine)
        self.retention = RetentionRecords(engine)
        self.processes = Processes(engine)
        self.study_view = StudyView(engine)
        self.web_access = WebAccess(engine)
