"""The database schema: every table the node keeps, as SQLAlchemy Core tables.

The Alembic revisions in ``migrations/`` build the same schema step by step; a test checks that
the head revision and these tables agree. The aggregates (``intake``, ``queue``, ...) are the only
modules that query them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)

associations = Table(
    "associations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String(128), nullable=False),  # host:pid of the receiver process
    Column("calling_ae", String(16), nullable=False),
    Column("called_ae", String(16), nullable=False),
    Column("peer_address", String(64), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime()),
    Column("end_reason", String(16)),
    Column("instances", Integer, nullable=False, server_default="0"),
    Index(None, "ended_at"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    # Bumped each time a study that was already queued receives a new instance.
    Column("revision", Integer, nullable=False, server_default="1"),
    Column("accession_number", String(16), nullable=False, server_default=""),
    Column("study_date", String(8), nullable=False, server_default=""),
    Column("first_received_at", UTCDateTime(), nullable=False),
    Column("last_received_at", UTCDateTime(), nullable=False),
    Column("queued_at", UTCDateTime()),
    Column("outcome", String(16)),
    Column("inferred_at", UTCDateTime()),
    # The priority table (architecture.md, result contract item 4): these columns only move up.
    Column("score", Float),  # highest probability any analysis of the study gave
    Column("operating_point", String(32)),  # strictest operating point that score reached
    Column("model_version", String(32)),
    Column("flagged_at", UTCDateTime()),  # first positive result
    Column("reported_at", UTCDateTime()),  # a radiologist's report is known
    Column("report_source", String(16)),  # c-find, qido-rs, hl7, cli or web
    Column("reported_by", String(64)),  # the web user who marked it reported
    Column("escalations", Integer, nullable=False, server_default="0"),
    Column("escalated_at", UTCDateTime()),
    Column("checked_at", UTCDateTime()),  # last C-FIND for reports
    Column("purged_at", UTCDateTime()),  # retention removed its spooled files
    Index(None, "state", "last_received_at"),
    Index(None, "flagged_at", "reported_at"),
    Index(None, "accession_number"),
    # The worklist (unreported positives by score): a partial index holds only them, however
    # many studies the table keeps.
    Index(
        "ix_studies_worklist",
        "score",
        "first_received_at",
        postgresql_where=text("flagged_at IS NOT NULL AND reported_at IS NULL"),
        sqlite_where=text("flagged_at IS NOT NULL AND reported_at IS NULL"),
    ),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("series_uid", UID, nullable=False, unique=True),
    Column("modality", String(16), nullable=False, server_default=""),
    Column("body_part", String(64), nullable=False, server_default=""),
    Column("description", String(64), nullable=False, server_default=""),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("series_id", ForeignKey("series.id"), nullable=False, index=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("path", String(255), nullable=False),  # relative to the spool root
    Column("size_bytes", BigInteger, nullable=False),
    Column("association_id", ForeignKey("associations.id"), index=True),
    Column("received_at", UTCDateTime(), nullable=False, index=True),
    Column("purged_at", UTCDateTime()),  # retention removed the file
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("study_revision", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("run_after", UTCDateTime(), nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires_at", UTCDateTime()),
    Column("finished_at", UTCDateTime()),
    Column("last_error", Text, info={"max_length": 4000}),
    Index(None, "state", "run_after"),
)

study_results = Table(
    "study_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, unique=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("study_revision", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("score", Float),
    Column("operating_point", String(32)),
    Column("positive_high_sensitivity", Boolean, nullable=False),
    Column("positive_high_specificity", Boolean, nullable=False),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("images", Integer, nullable=False),
    Column("skipped", Integer, nullable=False),
    Column("preprocess_ms", Float, nullable=False),
    Column("inference_ms", Float, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

image_results = Table(
    "image_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_result_id", ForeignKey("study_results.id"), nullable=False, index=True),
    Column("instance_id", ForeignKey("instances.id"), nullable=False, index=True),
    # NULL probability: the image was skipped, and ``skip_reason`` says why.
    Column("probability", Float),
    Column("peak_row", Integer),
    Column("peak_column", Integer),
    Column("peak_value", Float),
    Column("peak_area", Float),
    Column("skip_reason", Text, info={"max_length": 1000}),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String(128), nullable=False, unique=True),  # host:pid of the worker
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("jobs_done", Integer, nullable=False, server_default="0"),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime()),
)

services = Table(
    "services",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String(128), nullable=False, unique=True),  # host:pid of the supervisor
    Column("version", String(32), nullable=False),
    Column("ae_title", String(16), nullable=False),
    Column("port", Integer, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("stopped_at", UTCDateTime()),
)


outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", ForeignKey("studies.id"), nullable=False, index=True),
    Column("result_version", Integer, nullable=False),  # the study revision analysed
    Column("kind", String(8), nullable=False),  # sr, sc or ko
    Column("sop_class_uid", String(64), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),  # the result file in the spool
    Column("destination", String(128), nullable=False),  # AE@host:port
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("last_status", Integer),
    Column("last_error", Text, info={"max_length": 4000}),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime()),
    UniqueConstraint("destination", "sop_instance_uid"),
    Index(None, "state", "next_attempt_at"),
)

retention_runs = Table(
    "retention_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ran_at", UTCDateTime(), nullable=False, index=True),
    Column("studies_purged", Integer, nullable=False),  # spooled files removed
    Column("files_removed", Integer, nullable=False),
    Column("bytes_freed", BigInteger, nullable=False),
    Column("studies_deleted", Integer, nullable=False),  # rows past retention.priority_days
)

# The web interface's users, their sessions and the audit trail of what they did.
web_users = Table(
    "web_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),  # Argon2id, PHC string
    Column("role", String(16), nullable=False),  # reader or admin
    Column("created_at", UTCDateTime(), nullable=False),
    Column("password_changed_at", UTCDateTime(), nullable=False),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    # SHA-256 of the cookie's random token: a copy of the database signs no one in.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user_id", ForeignKey("web_users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", UTCDateTime(), nullable=False, index=True),
    Column("username", String(64), nullable=False),
    Column("action", String(32), nullable=False),  # sign_in, sign_in_failed, mark_reported...
    Column("peer", String(64), nullable=False, server_default=""),
    Column("target", String(128), nullable=False, server_default=""),  # study UID, outbox id
    Column("detail", Text, info={"max_length": 1000}),
)


def fit(table: Table, column: str, value: str) -> str:
    """*value* cut to the length of ``table.column`` (hostile DICOM strings can be longer): the
    type's length, or for a Text column the ``max_length`` the node keeps of it."""
    col = table.c[column]
    length = getattr(col.type, "length", None) or col.info.get("max_length")
    return value if length is None else value[:length]
