"""completions table

Revision ID: 0001_completions
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_completions"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("request_id", sa.String(), primary_key=True),
        sa.Column("client_request_id", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.String(), nullable=True),
        sa.Column("application", sa.String(), nullable=True),
        sa.Column("key_id", sa.String(), nullable=True),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_type", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("total_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cost", sa.Numeric(20, 10), nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("streamed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("request_body", sa.LargeBinary(), nullable=True),
        sa.Column("response_body", sa.LargeBinary(), nullable=True),
        sa.Column("enc_key_id", sa.String(), nullable=True),
    )
    op.create_index("ix_completions_created_at", "completions", ["created_at"])
    op.create_index("ix_completions_user_id", "completions", ["user_id", "created_at"])
    op.create_index("ix_completions_application", "completions", ["application", "created_at"])
    op.create_index("ix_completions_provider", "completions", ["provider", "created_at"])
    op.create_index("ix_completions_key_id", "completions", ["key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_completions_key_id", table_name="completions")
    op.drop_index("ix_completions_provider", table_name="completions")
    op.drop_index("ix_completions_application", table_name="completions")
    op.drop_index("ix_completions_user_id", table_name="completions")
    op.drop_index("ix_completions_created_at", table_name="completions")
    op.drop_table("completions")
