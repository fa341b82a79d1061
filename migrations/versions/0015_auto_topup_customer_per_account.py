"""A Stripe customer belongs to one account: no two auto top-ups name the same `stripe_customer`.

Without it, one account's token could point its auto top-up at the customer and card another account saved,
and the job would charge that card for its own credits (SPEC §7). The upgrade fails while two accounts'
auto top-ups share a customer: those are to be resolved by hand first (at most one of them is the card's
owner).

Revision ID: 0015_auto_topup_customer
Revises: 0014_ledger_analyze_threshold
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015_auto_topup_customer"
down_revision: str | None = "0014_ledger_analyze_threshold"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("uq_auto_topups_stripe_customer", "auto_topups", ["stripe_customer"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_auto_topups_stripe_customer", table_name="auto_topups")
