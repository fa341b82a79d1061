"""The reconciler reads what the ledger credited in its window through an index of `fulfilments.created_at`.

Why: every run (every 5 minutes by default) compares the credits of its window (the last 72 hours) with Stripe,
and with no index on the time it read every fulfilment ever made: a sequential scan that grows by one row per
paid purchase, forever (docs/performance.md, session 22). A fulfilment is written once per purchase, so the
index costs the purchase path one insertion. Built CONCURRENTLY.

Revision ID: 0023_fulfilments_by_time
Revises: 0022_balances_purchased
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0023_fulfilments_by_time"
down_revision: str | None = "0022_balances_purchased"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_fulfilments_created_at", "fulfilments", ["created_at"], postgresql_concurrently=True, if_not_exists=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_fulfilments_created_at", table_name="fulfilments", postgresql_concurrently=True)
