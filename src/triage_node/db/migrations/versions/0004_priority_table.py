"""priority table columns on studies: score, flag, report status, escalation

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import triage_node.db.schema

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TIMES = ("flagged_at", "reported_at", "escalated_at", "checked_at")


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("operating_point", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("model_version", sa.String(length=32), nullable=True))
        for name in _TIMES[:2]:
            batch_op.add_column(sa.Column(name, triage_node.db.schema.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("report_source", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("escalations", sa.Integer(), server_default="0", nullable=False)
        )
        for name in _TIMES[2:]:
            batch_op.add_column(sa.Column(name, triage_node.db.schema.UTCDateTime(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_studies_flagged_at_reported_at"), ["flagged_at", "reported_at"]
        )
        batch_op.create_index(batch_op.f("ix_studies_accession_number"), ["accession_number"])
    # Studies analysed before this version: their best result becomes their priority.
    op.execute(
        """
        UPDATE studies SET
            score = (SELECT max(r.score) FROM study_results r WHERE r.study_id = studies.id),
            flagged_at = (SELECT min(r.created_at) FROM study_results r
                          WHERE r.study_id = studies.id AND r.outcome = 'positive')
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_accession_number"))
        batch_op.drop_index(batch_op.f("ix_studies_flagged_at_reported_at"))
        for name in (
            "checked_at",
            "escalated_at",
            "escalations",
            "report_source",
            "reported_at",
            "flagged_at",
            "model_version",
            "operating_point",
            "score",
        ):
            batch_op.drop_column(name)
