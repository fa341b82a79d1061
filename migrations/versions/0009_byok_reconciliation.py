"""BYOK fee reconciliation: the corrections it posts and the months it has closed.

Revision ID: 0009_byok_reconciliation
Revises: 0008_reconcile_tickets
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_byok_reconciliation"
down_revision: str | None = "0008_reconcile_tickets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)
MONEY = sa.Numeric(38, 12)


def upgrade() -> None:
    op.create_table(
        "byok_corrections",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("expected", MONEY, nullable=False),
        sa.Column("charged", MONEY, nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("amount <> 0", name="ck_byok_corrections_amount"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_byok_corrections_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["journal_entries.id"], name="fk_byok_corrections_entry_id_journal_entries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_byok_corrections"),
        sa.UniqueConstraint("entry_id", name="uq_byok_corrections_entry_id"),
    )
    op.create_index("ix_byok_corrections_account_id_month", "byok_corrections", ["account_id", "month"])
    op.create_table(
        "byok_month_closings",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("closed_at", TS, nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_byok_month_closings_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["journal_entries.id"], name="fk_byok_month_closings_entry_id_journal_entries"
        ),
        sa.PrimaryKeyConstraint("account_id", "month", name="pk_byok_month_closings"),
    )


def downgrade() -> None:
    op.drop_table("byok_month_closings")
    op.drop_index("ix_byok_corrections_account_id_month", table_name="byok_corrections")
    op.drop_table("byok_corrections")
