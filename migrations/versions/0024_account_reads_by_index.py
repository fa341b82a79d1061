"""Two reads of one account through an index of their own: its disputes not won, and its auto top-ups by time.

- `ix_disputes_account_id_not_won (account_id) WHERE status <> 'won'`: every account read (`find_account`, behind
  nearly every account, key, purchase and console call) asks whether the account has a dispute it did not win
  (`flagged`), and with no index on `disputes.account_id` that was a sequential scan of every dispute.
- `ix_auto_topup_attempts_account_id_created_at (account_id, created_at)`: the auto top-up job asks, for each
  due account with a monthly cap, what its top-ups took since the month began; through `(account_id, id)` that
  read every attempt the account ever made.

Found by session 22's audit of statements under the generic plan (docs/performance.md). Both tables are
written rarely (a chargeback, a top-up), so each index costs little. Built CONCURRENTLY.

Revision ID: 0024_account_reads_by_index
Revises: 0023_fulfilments_by_time
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024_account_reads_by_index"
down_revision: str | None = "0023_fulfilments_by_time"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_WON = sa.text("status <> 'won'")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_disputes_account_id_not_won", "disputes", ["account_id"], postgresql_where=NOT_WON,
            postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip
        op.create_index(
            "ix_auto_topup_attempts_account_id_created_at", "auto_topup_attempts", ["account_id", "created_at"],
            postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_auto_topup_attempts_account_id_created_at", table_name="auto_topup_attempts",
                      postgresql_concurrently=True)  # fmt: skip
        op.drop_index("ix_disputes_account_id_not_won", table_name="disputes", postgresql_concurrently=True)
