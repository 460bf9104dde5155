"""analysis results and workers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:28:11.849360
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import triage_node.db.schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("jobs_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", triage_node.db.schema.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", triage_node.db.schema.UTCDateTime(), nullable=False),
        sa.Column("stopped_at", triage_node.db.schema.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("owner", name=op.f("uq_workers_owner")),
    )
    op.create_table(
        "study_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("study_revision", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("operating_point", sa.String(length=32), nullable=True),
        sa.Column("positive_high_sensitivity", sa.Boolean(), nullable=False),
        sa.Column("positive_high_specificity", sa.Boolean(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("preprocess_ms", sa.Float(), nullable=False),
        sa.Column("inference_ms", sa.Float(), nullable=False),
        sa.Column("created_at", triage_node.db.schema.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_study_results_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_results_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_results")),
        sa.UniqueConstraint("job_id", name=op.f("uq_study_results_job_id")),
    )
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_results_study_id"), ["study_id"], unique=False)

    op.create_table(
        "image_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_result_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("peak_row", sa.Integer(), nullable=True),
        sa.Column("peak_column", sa.Integer(), nullable=True),
        sa.Column("peak_value", sa.Float(), nullable=True),
        sa.Column("peak_area", sa.Float(), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_image_results_instance_id_instances")
        ),
        sa.ForeignKeyConstraint(
            ["study_result_id"],
            ["study_results.id"],
            name=op.f("fk_image_results_study_result_id_study_results"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_results")),
    )
    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_image_results_instance_id"), ["instance_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_image_results_study_result_id"), ["study_result_id"], unique=False
        )

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("inferred_at", triage_node.db.schema.UTCDateTime(), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("inferred_at")
        batch_op.drop_column("outcome")

    with op.batch_alter_table("image_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_image_results_study_result_id"))
        batch_op.drop_index(batch_op.f("ix_image_results_instance_id"))

    op.drop_table("image_results")
    with op.batch_alter_table("study_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_results_study_id"))

    op.drop_table("study_results")
    op.drop_table("workers")
