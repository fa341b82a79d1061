"""A Stripe refund is booked once, whichever of the API and the `charge.refunded` webhook records it first.

`refunds.reported_at`: for a refund booked from `charge.refunded`, the `created` of the event whose
cumulative amount it booked (Stripe's clock). The API, retrying a refund Stripe made but the ledger did not
record, recognises a booking without a Stripe id as possibly its own only when the event came after the
refund. Existing webhook bookings take it from their event (`created_by` names it), else their `created_at`.

Checks: a booking from the webhook has `reported_at` and only it does; a booking by the API always names its
Stripe refund, so the unique key on `stripe_refund` (0004) holds every API booking to one per Stripe refund.

Revision ID: 0016_refunds_booked_once
Revises: 0015_auto_topup_customer
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016_refunds_booked_once"
down_revision: str | None = "0015_auto_topup_customer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("refunds", sa.Column("reported_at", TS, nullable=True))
    op.execute(
        "UPDATE refunds r SET reported_at = coalesce((SELECT to_timestamp((e.payload->>'created')::bigint)"
        " FROM stripe_events e WHERE 'stripe_event:' || e.id = r.created_by), r.created_at) WHERE r.source = 'stripe'"
    )
    op.create_check_constraint("ck_refunds_reported", "refunds", "(source = 'stripe') = (reported_at IS NOT NULL)")
    op.create_check_constraint(
        "ck_refunds_api_names_stripe_refund", "refunds", "source <> 'api' OR stripe_refund IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_constraint("ck_refunds_api_names_stripe_refund", "refunds", type_="check")
    op.drop_constraint("ck_refunds_reported", "refunds", type_="check")
    op.drop_column("refunds", "reported_at")
