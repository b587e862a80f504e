"""responses: stored responses of the Responses API (tenant-scoped, bodies encrypted like records).

Revision ID: 0004_responses
Revises: 0003_completions_outcome
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_responses"
down_revision = "0003_completions_outcome"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(), primary_key=True),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("provider", sa.String(), nullable=True),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("native", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("previous_response_id", sa.String(), nullable=True),
        sa.Column("history", sa.LargeBinary(), nullable=True),
        sa.Column("input_items", sa.LargeBinary(), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("enc_key_id", sa.String(), nullable=True),
    )
    op.create_index("ix_responses_tenant", "responses", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_responses_tenant", table_name="responses")
    op.drop_table("responses")
