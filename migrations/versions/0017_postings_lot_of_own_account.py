"""A posting names only a lot of its own account: the foreign key `postings.lot_id → lots.id` becomes
`(lot_id, account_id) → lots (id, account_id)`, on a new unique key of `lots`.

A posting drawing on another account's lot leaves every cache equal to its postings while the lots no longer
make the balances (`billing verify` reports it too, `posting_on_another_accounts_lot`). The composite key
replaces the one-column one, so a charge's postings still cost one index probe each (now of
`uq_lots_id_account_id` instead of `pk_lots`); only a new lot (a purchase or grant, not a charge) pays one
more index insertion. A posting without a lot (NULL `lot_id`) is not checked, as before.

The unique index is built CONCURRENTLY, and the key is added NOT VALID then validated outside the
transaction that added it: `lots` and `postings` are written on every charge.

Revision ID: 0017_postings_lot_of_own_account
Revises: 0016_refunds_booked_once
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017_postings_lot_of_own_account"
down_revision: str | None = "0016_refunds_booked_once"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "uq_lots_id_account_id", "lots", ["id", "account_id"], unique=True, postgresql_concurrently=True,
            if_not_exists=True,
        )  # fmt: skip
    op.execute("ALTER TABLE lots ADD CONSTRAINT uq_lots_id_account_id UNIQUE USING INDEX uq_lots_id_account_id")
    op.drop_constraint("fk_postings_lot_id_lots", "postings", type_="foreignkey")
    op.create_foreign_key(
        "fk_postings_lot_id_account_id_lots", "postings", "lots", ["lot_id", "account_id"], ["id", "account_id"],
        postgresql_not_valid=True,
    )  # fmt: skip
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE postings VALIDATE CONSTRAINT fk_postings_lot_id_account_id_lots")


def downgrade() -> None:
    op.create_foreign_key("fk_postings_lot_id_lots", "postings", "lots", ["lot_id"], ["id"], postgresql_not_valid=True)
    op.drop_constraint("fk_postings_lot_id_account_id_lots", "postings", type_="foreignkey")
    op.drop_constraint("uq_lots_id_account_id", "lots", type_="unique")
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE postings VALIDATE CONSTRAINT fk_postings_lot_id_lots")
