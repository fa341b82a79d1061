"""Partial indexes for the BYOK fee reconciliation's month scans of `generations`: which accounts had
charged BYOK generations in a month, and one account's of that month. Only BYOK rows are indexed, so
ordinary charges pay nothing for them. Built CONCURRENTLY: `generations` is written on every charge.

Revision ID: 0011_byok_generation_indexes
Revises: 0010_auto_topup
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_byok_generation_indexes"
down_revision: str | None = "0010_auto_topup"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BYOK_CHARGED = sa.text("is_byok AND status = 'charged'")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_generations_byok_created_at", "generations", ["created_at"],
            postgresql_where=BYOK_CHARGED, postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip
        op.create_index(
            "ix_generations_byok_account_created_at", "generations", ["account_id", "created_at"],
            postgresql_where=BYOK_CHARGED, postgresql_concurrently=True, if_not_exists=True,
        )  # fmt: skip


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_generations_byok_account_created_at", table_name="generations",
            postgresql_concurrently=True, if_exists=True,
        )  # fmt: skip
        op.drop_index(
            "ix_generations_byok_created_at", table_name="generations",
            postgresql_concurrently=True, if_exists=True,
        )  # fmt: skip
