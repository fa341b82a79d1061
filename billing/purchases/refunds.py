"""Which refunds the rules allow (SPEC §5), as pure functions. No I/O.

Unused credits of a card purchase can be refunded within 24 hours of its payment, to the original payment
method; the fee is never refunded; crypto purchases are never refundable; a refund never exceeds what is
left of the purchase's lot (in whole cents: Stripe refunds cents).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal

from billing.ledger import outcomes
from billing.ledger.money import format_money
from billing.ledger.outcomes import Refused
from billing.purchases.fees import CENT, is_whole_cents

REFUND_WINDOW = timedelta(hours=24)


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
