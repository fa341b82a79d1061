"""Disputes (chargebacks) of purchases: credits clawed back when a dispute opens, given back if it is won.

Revision ID: 0005_disputes
Revises: 0004_refunds
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_disputes"
down_revision: str | None = "0004_refunds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12)
TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "disputes",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("stripe_dispute", sa.Text(), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("fee_amount", MONEY, nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("reinstated_entry_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("closed_at", TS, nullable=True),
        sa.CheckConstraint("status IN ('open', 'won', 'lost')", name="ck_disputes_status"),
        sa.CheckConstraint("amount >= 0 AND fee_amount >= 0 AND amount + fee_amount > 0", name="ck_disputes_amounts"),
        sa.CheckConstraint("(status = 'won') = (reinstated_entry_id IS NOT NULL)", name="ck_disputes_reinstated"),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_disputes_purchase_id_purchases"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_disputes_account_id_accounts"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_disputes_entry_id_journal_entries"),
        sa.ForeignKeyConstraint(
            ["reinstated_entry_id"], ["journal_entries.id"], name="fk_disputes_reinstated_entry_id_journal_entries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_disputes"),
        sa.UniqueConstraint("stripe_dispute", name="uq_disputes_stripe_dispute"),
        sa.UniqueConstraint("entry_id", name="uq_disputes_entry_id"),
        sa.UniqueConstraint("reinstated_entry_id", name="uq_disputes_reinstated_entry_id"),
    )
    op.create_index("ix_disputes_purchase_id", "disputes", ["purchase_id"])


def downgrade() -> None:
    op.drop_index("ix_disputes_purchase_id", table_name="disputes")
    op.drop_table("disputes")
