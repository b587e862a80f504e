"""completions.outcome: how the response ended (completed, error, upstream_error, client_gone, shutdown,
response_failed).  Rows written before this revision keep NULL.

Revision ID: 0003_completions_outcome
Revises: 0002_api_keys
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_completions_outcome"
down_revision = "0002_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("completions", sa.Column("outcome", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("completions") as batch:
        batch.drop_column("outcome")
