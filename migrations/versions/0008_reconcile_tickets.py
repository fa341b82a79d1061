"""The missing-credit reconciler's runs, and support tickets for missing credits.

Revision ID: 0008_reconcile_tickets
Revises: 0007_organization_members
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_reconcile_tickets"
down_revision: str | None = "0007_organization_members"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)
COUNTS = ("seen", "young", "already_credited", "credited", "needs_review", "unpaid_credits", "amount_mismatches")


def upgrade() -> None:
    op.create_table(
        "reconcile_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("window_end", TS, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in COUNTS),
        sa.Column("findings", postgresql.JSONB(), nullable=False),
        sa.CheckConstraint(
            "seen >= 0 AND young >= 0 AND already_credited >= 0 AND credited >= 0 AND needs_review >= 0"
            " AND unpaid_credits >= 0 AND amount_mismatches >= 0",
            name="ck_reconcile_runs_counts",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_runs"),
    )
    op.create_index("ix_reconcile_runs_started_at", "reconcile_runs", ["started_at"])
    op.create_table(
        "support_tickets",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("payment_intent", sa.Text(), nullable=True),
        sa.Column("checkout_session", sa.Text(), nullable=True),
        sa.Column("window_start", TS, nullable=True),
        sa.Column("window_end", TS, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("resolution", sa.Text(), nullable=False),
        sa.Column("findings", postgresql.JSONB(), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("resolved_at", TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('credited', 'already_credited', 'not_paid', 'wrong_account', 'needs_review')",
            name="ck_support_tickets_status",
        ),
        sa.CheckConstraint(
            "(payment_intent IS NOT NULL)::int + (checkout_session IS NOT NULL)::int"
            " + (window_start IS NOT NULL)::int = 1",
            name="ck_support_tickets_one_reference",
        ),
        sa.CheckConstraint(
            "(window_start IS NULL) = (window_end IS NULL) AND window_start < window_end",
            name="ck_support_tickets_window",
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_support_tickets_account_id_accounts"),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_support_tickets_purchase_id_purchases"),
        sa.ForeignKeyConstraint(
            ["entry_id"], ["journal_entries.id"], name="fk_support_tickets_entry_id_journal_entries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_support_tickets"),
    )
    op.create_index("ix_support_tickets_status", "support_tickets", ["status", "id"])
    op.create_index("ix_support_tickets_account_id", "support_tickets", ["account_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_support_tickets_account_id", table_name="support_tickets")
    op.drop_index("ix_support_tickets_status", table_name="support_tickets")
    op.drop_table("support_tickets")
    op.drop_index("ix_reconcile_runs_started_at", table_name="reconcile_runs")
    op.drop_table("reconcile_runs")
