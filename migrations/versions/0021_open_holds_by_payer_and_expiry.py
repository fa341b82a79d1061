"""An account's (or a key's) open holds are read through an index of the payer and the expiry together:
`ix_open_holds_account_id_expires_at (account_id, expires_at)` and `ix_open_holds_key_id_expires_at (key_id,
expires_at) WHERE key_id IS NOT NULL` replace the indexes of the payer alone.

Why: every admission sums the payer's open holds not yet expired (`account_id = $1 AND expires_at > $2`). With
an index of the account alone beside one of the expiry alone, the planner's generic plan (the hot path prepares
its statements with `plan_cache_mode = force_generic_plan`) costed the two about alike, and after some
ANALYZEs of `open_holds` it chose the expiry's: a range scan of every hold expiring after now, open or
resolved since the last vacuum. At 700 hold + capture pairs a second (the benchmark's half load) that is
every hold of the last minute (autovacuum visits a database once a minute): each state read walked up to
26,000 index entries to find one hold, PostgreSQL's CPU doubled within a minute at the same offered rate and
the calls' median went from 4 to 45 ms (docs/performance.md, session 22). With both columns in one index the
read is bounded to the payer's unexpired range whatever the statistics say, and the planner prefers it. The
index of the expiry alone stays for the expiry job (`expires_at <= $1`).

Built CONCURRENTLY, the old indexes dropped CONCURRENTLY: `open_holds` is written on every hold and capture.

Revision ID: 0021_open_holds_by_payer_expiry
Revises: 0020_live_lots
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021_open_holds_by_payer_expiry"
down_revision: str | None = "0020_live_lots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYED = sa.text("key_id IS NOT NULL")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_open_holds_account_id_expires_at", "open_holds", ["account_id", "expires_at"],
            postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip
        op.create_index(
            "ix_open_holds_key_id_expires_at", "open_holds", ["key_id", "expires_at"], postgresql_where=KEYED,
            postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip
        op.drop_index("ix_open_holds_account_id", table_name="open_holds", postgresql_concurrently=True)
        op.drop_index("ix_open_holds_key_id", table_name="open_holds", postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_open_holds_account_id", "open_holds", ["account_id"], postgresql_concurrently=True, if_not_exists=True
        )
        op.create_index(
            "ix_open_holds_key_id", "open_holds", ["key_id"], postgresql_where=KEYED, postgresql_concurrently=True,
            if_not_exists=True,
        )  # fmt: skip
        op.drop_index("ix_open_holds_account_id_expires_at", table_name="open_holds", postgresql_concurrently=True)
        op.drop_index("ix_open_holds_key_id_expires_at", table_name="open_holds", postgresql_concurrently=True)
