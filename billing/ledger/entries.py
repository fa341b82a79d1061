"""Pure functions that build balanced journal entries. The store persists what these return and never
invents postings of its own (STYLE: Beancount's core).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from billing.ledger import outcomes
from billing.ledger.lots import consume, debt_settled_by, reserved_by
from billing.ledger.model import (
    NEW_LOT,
    Customer,
    Entry,
    EntryKind,
    Hold,
    LotBalance,
    LotCategory,
    NewLot,
    Platform,
    Posting,
)
from billing.ledger.money import ZERO, format_money
from billing.ledger.outcomes import Refused

# Where a staff grant's credits come from, by lot category.
GRANT_SOURCE: dict[LotCategory, Platform] = {
    LotCategory.PAID: Platform.MANUAL_PAYMENTS,
    LotCategory.PROMOTIONAL: Platform.PROMOTIONAL_CREDITS,
    LotCategory.COMPENSATION: Platform.COMPENSATION_CREDITS,
}


def _check_expiry(expires_at: datetime, now: datetime) -> None:
    if expires_at <= now:
        raise Refused(outcomes.EXPIRY_IN_PAST, "`expires_at` must be in the future.")


def new_lot_postings(customer: Customer, amount: Decimal, debt: Decimal) -> list[Posting]:
    """Credits into the lot the entry creates. Existing debt is paid from it first, inside the customer's
    own account (lot → no lot), so what is left of every lot plus debt always equals the balance.
    """
    postings = [Posting(customer, amount, NEW_LOT)]
    settled = debt_settled_by(debt, amount)
    if settled:
        postings += [Posting(customer, -settled, NEW_LOT), Posting(customer, settled, None)]
    return postings


def grant(
    customer: Customer,
    amount: Decimal,
    *,
    category: LotCategory,
    expires_at: datetime,
    debt: Decimal,
    now: datetime,
    reason: str,
    actor: str,
) -> Entry:
    """Staff grant: a new lot of `category`, funded by the platform account for that category."""
    if amount <= 0:
        raise Refused(outcomes.AMOUNT_MUST_BE_POSITIVE, "A grant must be a positive amount.")
    _check_expiry(expires_at, now)
    return Entry(
        kind=EntryKind.GRANT,
        customer=customer,
        postings=(*new_lot_postings(customer, amount, debt), Posting(GRANT_SOURCE[category], -amount)),
        credits_delta=amount,
        new_lot=NewLot(category, amount, expires_at),
        description=f"{category.value} grant of {format_money(amount)} USD",
        reason=reason,
        actor=actor,
    )


def adjustment(
    customer: Customer,
    amount: Decimal,
    *,
    category: LotCategory,
    expires_at: datetime,
    lots: Iterable[LotBalance],
    debt: Decimal,
    now: datetime,
    reason: str,
    actor: str,
) -> Entry:
    """Staff correction of a balance, against `manual_adjustments`.

    A positive adjustment adds a lot; a negative one takes credits out of live lots, soonest-expiring
    first, and is refused rather than driving the account into debt.
    """
    if amount == 0:
        raise Refused(outcomes.AMOUNT_MUST_NOT_BE_ZERO, "An adjustment must not be zero.")
    if amount > 0:
        _check_expiry(expires_at, now)
        postings = [*new_lot_postings(customer, amount, debt), Posting(Platform.MANUAL_ADJUSTMENTS, -amount)]
        new_lot: NewLot | None = NewLot(category, amount, expires_at)
    else:
        taken, shortfall = consume(lots, -amount, now)
        if shortfall:
            available = -amount - shortfall
            raise Refused(
                outcomes.INSUFFICIENT_CREDITS,
                f"The account has {format_money(available)} USD of live credits; cannot remove "
                f"{format_money(-amount)} USD.",
                available=format_money(available),
            )
        postings = [Posting(customer, -part, lot_id) for lot_id, part in taken]
        postings.append(Posting(Platform.MANUAL_ADJUSTMENTS, -amount))
        new_lot = None
    return Entry(
        kind=EntryKind.ADJUSTMENT,
        customer=customer,
        postings=tuple(postings),
        credits_delta=amount,
        new_lot=new_lot,
        description=f"adjustment of {format_money(amount)} USD",
        reason=reason,
        actor=actor,
    )


# Where the money of a purchase sits until Stripe settles it, by payment method.
PURCHASE_CLEARING: dict[str, Platform] = {
    "card": Platform.STRIPE_CLEARING,
    "crypto": Platform.CRYPTO_CLEARING,
}


def purchase(
    customer: Customer,
    *,
    credits: Decimal,
    fee: Decimal,
    method: str,
    expires_at: datetime,
    debt: Decimal,
    purchase_id: str,
    payment_intent: str,
) -> Entry:
    """A paid purchase (SPEC §5): the customer pays credits + fee; the credits become a new `paid` lot, the
    fee goes to purchase-fee revenue, and the whole charge sits in Stripe (or crypto) clearing.
    """
    if credits <= 0:
        raise Refused(outcomes.AMOUNT_MUST_BE_POSITIVE, "A purchase must be a positive amount.")
    if fee < 0:
        raise ValueError("a purchase fee is never negative")
    postings = new_lot_postings(customer, credits, debt)
    if fee:
        postings.append(Posting(Platform.PURCHASE_FEE_REVENUE, fee))
    postings.append(Posting(PURCHASE_CLEARING[method], -(credits + fee)))
    return Entry(
        kind=EntryKind.PURCHASE,
        customer=customer,
        postings=tuple(postings),
        credits_delta=credits,
        new_lot=NewLot(LotCategory.PAID, credits, expires_at),
        description=(
            f"{method} purchase {purchase_id} ({payment_intent}): {format_money(credits)} USD credits"
            f" + {format_money(fee)} USD fee"
        ),
    )


def expiry(customer: Customer, lots: Iterable[LotBalance], now: datetime, holds: Iterable[Hold] = ()) -> Entry | None:
    """Breakage (SPEC §5 Expiry: only unused credits expire): what is left of every lot whose expiry has
    passed moves to the `breakage` account, one posting per lot, in one entry; None when nothing expires.

    Credits the account's open `holds` reserve stay (`reserved_by`): a hold created before its lot expired
    is captured from that lot (`consume`), so what it reserves is not unused; a later run expires it once
    the hold is resolved or timed out. `total_credits` is unchanged (the credits were added; they were not
    refunded): the `expiry` entry kind is what shows them leaving. Expiring twice posts nothing more.
    """
    lots = tuple(lots)
    reserved = reserved_by(lots, holds)
    expired = [
        (lot, lot.remaining - reserved.get(lot.id, ZERO))
        for lot in sorted(lots, key=lambda lot: (lot.expires_at, lot.id))
        if lot.expires_at <= now
    ]
    expired = [(lot, amount) for lot, amount in expired if amount > 0]
    if not expired:
        return None
    total = sum((amount for _, amount in expired), ZERO)
    return Entry(
        kind=EntryKind.EXPIRY,
        customer=customer,
        postings=(*(Posting(customer, -amount, lot.id) for lot, amount in expired), Posting(Platform.BREAKAGE, total)),
        description=f"expiry of {len(expired)} lot(s): {format_money(total)} USD to breakage",
    )


def refund(
    customer: Customer, *, credits: Decimal, lot: int, purchase_id: str, reason: str | None, actor: str
) -> Entry:
    """A refund asked through the API (SPEC §5): unused credits of one purchase go back to its payment
    method, out of that purchase's lot. The fee is never refunded, so only credits move."""
    if credits <= 0:
        raise Refused(outcomes.AMOUNT_MUST_BE_POSITIVE, "A refund must be a positive amount.")
    return Entry(
        kind=EntryKind.REFUND,
        customer=customer,
        postings=(Posting(customer, -credits, lot), Posting(Platform.REFUNDS, credits)),
        credits_delta=-credits,
        description=f"refund of {format_money(credits)} USD of purchase {purchase_id}",
        reason=reason,
        actor=actor,
    )


def clawback(
    customer: Customer,
    *,
    credits: Decimal,
    fee: Decimal,
    purchase_lot: LotBalance | None,
    lots: Iterable[LotBalance],
    now: datetime,
    to: Platform,
    kind: EntryKind,
    description: str,
) -> Entry:
    """Money Stripe gave back or took back (a refund made in its dashboard, a dispute): the credits come out
    of the purchase's own lot first, then other live lots soonest-expiring first, and what no lot covers
    becomes debt — the account may go negative (SPEC §5). A returned fee reverses fee revenue.
    """
    if credits < 0 or fee < 0 or credits + fee <= 0:
        raise ValueError("a clawback takes back a positive amount")
    postings: list[Posting] = []
    left = credits
    if purchase_lot is not None and purchase_lot.expires_at > now and purchase_lot.remaining > 0:
        part = min(purchase_lot.remaining, left)
        postings.append(Posting(customer, -part, purchase_lot.id))
        left -= part
    others = [lot for lot in lots if purchase_lot is None or lot.id != purchase_lot.id]
    taken, shortfall = consume(others, left, now) if left else ([], left)
    postings += [Posting(customer, -part, lot_id) for lot_id, part in taken]
    if shortfall:
        postings.append(Posting(customer, -shortfall, None))
    if fee:
        postings.append(Posting(Platform.PURCHASE_FEE_REVENUE, -fee))
    postings.append(Posting(to, credits + fee))
    return Entry(
        kind=kind,
        customer=customer,
        postings=tuple(postings),
        credits_delta=-credits,
        description=description,
    )


def dispute_won(
    customer: Customer,
    *,
    credits: Decimal,
    fee: Decimal,
    expires_at: datetime,
    debt: Decimal,
    reverses: int,
    description: str,
) -> Entry:
    """A dispute decided for us: what its clawback took is given back — the credits as a new `paid` lot
    (with the purchase lot's expiry; existing debt is paid from it first), the fee to fee revenue. Either may
    be zero: a dispute of a purchase whose credits were already refunded took only the fee, and gives only
    the fee back (no lot)."""
    if credits < 0 or fee < 0 or credits + fee <= 0:
        raise ValueError("a won dispute gives back a positive amount")
    postings = new_lot_postings(customer, credits, debt) if credits else []
    if fee:
        postings.append(Posting(Platform.PURCHASE_FEE_REVENUE, fee))
    postings.append(Posting(Platform.DISPUTES, -(credits + fee)))
    return Entry(
        kind=EntryKind.DISPUTE,
        customer=customer,
        postings=tuple(postings),
        credits_delta=credits,
        new_lot=NewLot(LotCategory.PAID, credits, expires_at) if credits else None,
        description=description,
        reverses=reverses,
    )


def refund_failed(
    customer: Customer,
    *,
    credits: Decimal,
    lot: LotBalance,
    debt: Decimal,
    now: datetime,
    reverses: int,
    description: str,
) -> Entry:
    """A refund Stripe could not complete (failed or canceled): its credits come back, reversing the refund
    entry. They go back into the lot the refund took them from, which keeps its expiry — a refund that never
    happened neither lengthens nor shortens the credits' life. Existing debt is paid from them first while the
    lot is live; into an expired lot they go as they are, and expiry moves them to breakage. The fee was never
    part of an API refund, so it is not part of this either."""
    if credits <= 0:
        raise ValueError("a failed refund gives back a positive amount of credits")
    postings = [Posting(customer, credits, lot.id)]
    settled = debt_settled_by(debt, credits) if lot.expires_at > now else Decimal(0)
    if settled:
        postings += [Posting(customer, -settled, lot.id), Posting(customer, settled, None)]
    postings.append(Posting(Platform.REFUNDS, -credits))
    return Entry(
        kind=EntryKind.REVERSAL,
        customer=customer,
        postings=tuple(postings),
        credits_delta=credits,
        description=description,
        reverses=reverses,
    )
