"""Which refunds the rules allow (SPEC §5), as pure functions. No I/O.

Unused credits of a card purchase can be refunded within 24 hours of its payment, to the original payment
method; the fee is never refunded; crypto purchases are never refundable; a refund never exceeds what is
left of the purchase's lot (in whole cents: Stripe refunds cents).

And which Stripe refunds the ledger has booked, so that each is booked once, whichever of the API
(`refund_purchase`) and Stripe's `charge.refunded` (`reflect_stripe_refunds`) records it first.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

from billing.ledger import outcomes
from billing.ledger.money import format_money
from billing.ledger.outcomes import Refused
from billing.purchases.fees import CENT, is_whole_cents

REFUND_WINDOW = timedelta(hours=24)

# Stripe refund statuses that mean the money never reached the customer: such a refund no longer counts in
# the charge's `amount_refunded`.
UNDONE = frozenset({"failed", "canceled"})


def refundable(
    *,
    status: str,
    method: str,
    paid_at: datetime | None,
    now: datetime,
    lot_remaining: Decimal,
    lot_expired: bool,
    requested: Decimal | None,
) -> Decimal:
    """The credits to refund (all that is left, in whole cents, when `requested` is None), or `Refused`.

    Order of precedence: not paid, crypto, window closed, bad amount, nothing left, more than is left.
    """
    if status != "succeeded" or paid_at is None:
        raise Refused(outcomes.PURCHASE_NOT_PAID, "Only a paid purchase can be refunded.")
    if method == "crypto":
        raise Refused(outcomes.CRYPTO_NOT_REFUNDABLE, "Crypto purchases are never refundable.")
    if now > paid_at + REFUND_WINDOW:
        raise Refused(
            outcomes.REFUND_WINDOW_CLOSED,
            "A purchase can be refunded within 24 hours of its payment.",
            window_closed_at=(paid_at + REFUND_WINDOW).isoformat(),
        )
    if requested is not None:
        if requested <= 0:
            raise Refused(outcomes.AMOUNT_MUST_BE_POSITIVE, "A refund must be a positive amount.")
        if not is_whole_cents(requested):
            raise Refused(outcomes.AMOUNT_NOT_WHOLE_CENTS, "A refund is paid in whole cents: at most 2 decimals.")
    left = Decimal(0) if lot_expired else lot_remaining.quantize(CENT, rounding=ROUND_DOWN)
    if left <= 0:
        raise Refused(outcomes.NOTHING_LEFT_TO_REFUND, "Nothing is left of this purchase's credits to refund.")
    if requested is not None and requested > left:
        raise Refused(
            outcomes.REFUND_EXCEEDS_REMAINING,
            f"Only {format_money(left)} USD of this purchase's credits is left to refund.",
            remaining=format_money(left),
        )
    return requested if requested is not None else left


@dataclass(frozen=True, slots=True)
class RefundAtStripe:
    """A refund as Stripe shows it: in the charge's list, in an event, or answering a request."""

    id: str
    amount_cents: int
    status: str
    created: datetime
    refund_id: str | None  # our refund's id, from the metadata the API sets; None for a dashboard refund

    @property
    def counts(self) -> bool:
        """Whether it is in the charge's cumulative `amount_refunded`."""
        return self.status not in UNDONE


def at_stripe(obj: Mapping[str, Any]) -> RefundAtStripe | None:
    """A Stripe refund object read; None when it lacks its id, an integer amount or its `created`."""
    id_, amount, created = obj.get("id"), obj.get("amount"), obj.get("created")
    if not (isinstance(id_, str) and id_ and isinstance(amount, int) and isinstance(created, int)):
        return None
    meta = obj.get("metadata")
    ours = meta.get("refund_id") if isinstance(meta, Mapping) else None
    return RefundAtStripe(
        id=id_,
        amount_cents=amount,
        status=str(obj.get("status") or ""),
        created=datetime.fromtimestamp(created, UTC),
        refund_id=ours if isinstance(ours, str) and ours else None,
    )


def named_in(
    missing_cents: int, listed: Iterable[RefundAtStripe], booked: Collection[str]
) -> tuple[RefundAtStripe, ...] | None:
    """Which of a charge's refunds (`listed`: all of them) make up the `missing_cents` of its cumulative
    amount that the ledger has not booked, oldest first; None when no run of them adds up to it exactly.

    The cumulative amount grows in the order Stripe makes refunds, and `charge.refunded` books it from the
    start when it cannot name them: so bookings without a Stripe id hold the oldest refunds no booking names
    (`booked`: the Stripe ids the ledger holds), and the missing cents are the newest of those still counted."""
    run: list[RefundAtStripe] = []
    total = 0
    for r in sorted(listed, key=lambda r: (r.created, r.id), reverse=True):
        if total >= missing_cents:
            break
        if r.counts and r.id not in booked:
            run.append(r)
            total += r.amount_cents
    return tuple(reversed(run)) if run and total == missing_cents else None
