"""completions.ensemble_id: the ensemble request a record belongs to (docs/ensemble.md).  The parent record
of an ensemble request has its own request id there; each member call (and judge call) is a record of its
own with endpoint ``ensemble_member`` and the parent's id.  NULL for every other record.

Revision ID: 0005_completions_ensemble
Revises: 0004_responses
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_completions_ensemble"
down_revision = "0004_responses"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("completions", sa.Column("ensemble_id", sa.String(), nullable=True))
    op.create_index("ix_completions_ensemble_id", "completions", ["ensemble_id"])


def downgrade() -> None:
    op.drop_index("ix_completions_ensemble_id", "completions")
    with op.batch_alter_table("completions") as batch:
        batch.drop_column("ensemble_id")
