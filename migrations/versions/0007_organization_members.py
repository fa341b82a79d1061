"""Organization membership: which user accounts belong to an organization account, as `admin` or `member`.

Revision ID: 0007_organization_members
Revises: 0006_refund_failures
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007_organization_members"
down_revision: str | None = "0006_refund_failures"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "organization_members",
        sa.Column("organization_id", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("role IN ('admin', 'member')", name="ck_organization_members_role"),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["accounts.id"], name="fk_organization_members_organization_id_accounts"
        ),
        sa.ForeignKeyConstraint(["member_id"], ["accounts.id"], name="fk_organization_members_member_id_accounts"),
        sa.PrimaryKeyConstraint("organization_id", "member_id", name="pk_organization_members"),
    )
    op.create_index("ix_organization_members_member_id", "organization_members", ["member_id"])


def downgrade() -> None:
    op.drop_index("ix_organization_members_member_id", table_name="organization_members")
    op.drop_table("organization_members")
