"""The support tickets' API contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

Note = Annotated[str, msgspec.Meta(min_length=1, max_length=2000, description="What the customer reported.")]


class CreateTicket(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of: `payment_intent` (pi_…), `checkout_session` (cs_…), or `created_after` with
    `created_before` (the payments of the account made in that window)."""

    account: str
    payment_intent: str | None = None
    checkout_session: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    note: Note | None = None


class TicketPayment(msgspec.Struct):
    """One payment the ticket looked at: what Stripe showed, and what the ledger did with it."""

    payment_intent: str | None
    stripe_status: str | None  # Stripe's status of the PaymentIntent (or Checkout Session), None if not found
    amount: str | None  # what Stripe received or asks, in dollars
    currency: str | None
    purchase: str | None
    account: str | None  # the account the payment belongs to
    result: str  # credited | already_credited | not_paid | wrong_account | needs_review
    reason: str | None = None
    entry: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    checkout_session: str | None = None


class Window(msgspec.Struct):
    start: datetime
    end: datetime


class Ticket(msgspec.Struct):
    id: str
    account: str
    status: str  # credited | already_credited | not_paid | wrong_account | needs_review
    resolution: str
    payment_intent: str | None
    checkout_session: str | None
    window: Window | None
    purchase: str | None
    entry: str | None
    payments: list[TicketPayment]
    note: str | None
    created_by: str
    created_at: datetime
    resolved_at: datetime
    object: str = "support_ticket"
