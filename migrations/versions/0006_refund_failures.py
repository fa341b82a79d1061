"""Refunds that fail at Stripe: a refund row is `succeeded`, `failed` or `canceled`; a failed or canceled one
points at the reversal entry that put its credits back.

Revision ID: 0006_refund_failures
Revises: 0005_disputes
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_refund_failures"
down_revision: str | None = "0005_disputes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("refunds", sa.Column("status", sa.Text(), server_default=sa.text("'succeeded'"), nullable=False))
    op.add_column("refunds", sa.Column("failure_reason", sa.Text(), nullable=True))
    op.add_column("refunds", sa.Column("failed_at", TS, nullable=True))
    op.add_column("refunds", sa.Column("reversal_entry_id", sa.BigInteger(), nullable=True))
    op.create_check_constraint("ck_refunds_status", "refunds", "status IN ('succeeded', 'failed', 'canceled')")
    op.create_check_constraint(
        "ck_refunds_reversed",
        "refunds",
        "(status = 'succeeded') = (reversal_entry_id IS NULL AND failed_at IS NULL)",
    )
    op.create_foreign_key(
        "fk_refunds_reversal_entry_id_journal_entries", "refunds", "journal_entries", ["reversal_entry_id"], ["id"]
    )
    op.create_unique_constraint("uq_refunds_reversal_entry_id", "refunds", ["reversal_entry_id"])


def downgrade() -> None:
    op.drop_constraint("uq_refunds_reversal_entry_id", "refunds", type_="unique")
    op.drop_constraint("fk_refunds_reversal_entry_id_journal_entries", "refunds", type_="foreignkey")
    op.drop_constraint("ck_refunds_reversed", "refunds", type_="check")
    op.drop_constraint("ck_refunds_status", "refunds", type_="check")
    op.drop_column("refunds", "reversal_entry_id")
    op.drop_column("refunds", "failed_at")
    op.drop_column("refunds", "failure_reason")
    op.drop_column("refunds", "status")
