"""batches: files and batches of the OpenAI Files/Batches and Anthropic Message Batches APIs, with one row
per input line (tenant-scoped, bodies encrypted like records).

Revision ID: 0006_batches
Revises: 0005_completions_ensemble
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_batches"
down_revision = "0005_completions_ensemble"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "batch_files",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("filename", sa.String(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(), nullable=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("enc_key_id", sa.String(), nullable=True),
    )
    op.create_index("ix_batch_files_tenant", "batch_files", ["tenant", "created_at"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("api", sa.String(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("input_file_id", sa.String(), nullable=True),
        sa.Column("completion_window", sa.String(), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=True),
        sa.Column("errors", sa.Text(), nullable=True),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("user_id", sa.String(), nullable=True),
        sa.Column("application", sa.String(), nullable=True),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("ip", sa.String(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(), nullable=True),
        sa.Column("error_file_id", sa.String(), nullable=True),
        *(sa.Column(c, _TS, nullable=True) for c in (
            "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
            "cancelled_at", "archived_at")),
        sa.Column("mode", sa.String(), nullable=False, server_default="local"),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("upstream_id", sa.String(), nullable=True),
        sa.Column("upstream_status", sa.String(), nullable=True),
        sa.Column("upstream_cancelled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("lease_owner", sa.String(), nullable=True),
        sa.Column("lease_until", _TS, nullable=True),
    )
    op.create_index("ix_batches_tenant", "batches", ["tenant", "created_at"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.String(), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True),
        sa.Column("custom_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("lease_owner", sa.String(), nullable=True),
        sa.Column("lease_until", _TS, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("gen", sa.Integer(), nullable=False, server_default="0"),  # +1 per release: a new request id
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("enc_key_id", sa.String(), nullable=True),
    )
    op.create_index("ix_batch_lines_claim", "batch_lines", ["batch_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_batch_lines_claim", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_tenant", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_batch_files_tenant", table_name="batch_files")
    op.drop_table("batch_files")
