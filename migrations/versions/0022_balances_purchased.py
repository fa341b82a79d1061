"""What each customer has purchased in total, kept beside its balance: `balances.purchased`, written by the journal
with every entry (`Entry.purchased_delta`: the credits of a `paid` lot a purchase or a paid grant created), and
filled here from the lots the ledger already has.

Why: every free-model admission (and every key read, for `is_free_tier`) asks whether the account has purchased
$10 in total. It summed the account's paid lots: a running sum in expiry order meant to stop at $10, but the
generic plan the service's statements run with read every lot the account ever had first (a bitmap scan, a
sort, then the sum), and an account topping up automatically has a lot per top-up: thousands. Now it is one
primary-key read. `billing verify` checks the total against the lots (`purchased_mismatch`).

Adding a column with a constant default does not rewrite `balances`; the fill runs under the ACCESS EXCLUSIVE
lock the ALTER took, so no entry is written between them.

Revision ID: 0022_balances_purchased
Revises: 0021_open_holds_by_payer_expiry
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022_balances_purchased"
down_revision: str | None = "0021_open_holds_by_payer_expiry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12, asdecimal=True)


def upgrade() -> None:
    op.add_column("balances", sa.Column("purchased", MONEY, server_default=sa.text("0"), nullable=False))
    op.execute(
        "UPDATE balances b SET purchased = p.total"
        " FROM (SELECT l.account_id, sum(l.amount) AS total FROM lots l JOIN journal_entries e ON e.id = l.entry_id"
        "       WHERE l.category = 'paid' AND e.kind IN ('purchase', 'grant') GROUP BY l.account_id) p"
        " WHERE b.account_id = p.account_id"
    )


def downgrade() -> None:
    op.drop_column("balances", "purchased")
