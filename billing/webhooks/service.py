"""Stripe events: recorded once by event id, dispatched by type, handled in the same transaction.

Stripe delivers at least once, in any order, and retries for days. So:
- the `stripe_events` row (primary key: the event id) is inserted first, in the transaction that handles
  the event: a concurrent duplicate waits on it and then sees the event as already received; a handling
  failure rolls the row back too, the endpoint answers 5xx, and Stripe's retry handles it afresh;
- money moves only through `fulfil_payment`, keyed by the PaymentIntent, so two different events for one
  payment (a PaymentIntent and its Checkout Session) still credit it once; an event about a paid charge
  that arrives before the payment's own (a refund, a dispute) credits the payment first, the same way;
- an unknown event type is recorded as `ignored`; an event no purchase matches is kept as `needs_review`, and
  so is one whose object lacks a field its handler uses (an `id`, an integer amount): it is signed, so it
  is kept for a person to look at, never a 5xx that Stripe would retry for days.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import stripe
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.context import Context
from billing.errors import API, ApiError
from billing.purchases import refunds
from billing.purchases import service as purchases
from billing.purchases.service import Payment, Result
from billing.reconcile.stripe_payments import retrieve_payment, unavailable


@dataclass(frozen=True, slots=True)
class Handled:
    status: str  # processed | ignored | needs_review
    outcome: str
    purchase_id: int | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    event: str
    type: str
    status: str
    outcome: str
    duplicate: bool


# (context, the event's transaction, event id, the event's object, the Stripe client: None if not configured)
Handler = Callable[[Context, AsyncConnection, str, dict[str, Any], stripe.StripeClient | None], Awaitable[Handled]]


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _text(value: Any) -> str | None:
    """A string field of an event's object; None when it is absent, empty or not a string."""
    return value if isinstance(value, str) and value else None


def _id(value: Any) -> str | None:
    """A Stripe reference, expanded or not."""
    return _text(value.get("id") if isinstance(value, dict) else value)


def _purchase_id(obj: dict[str, Any]) -> str | None:
    """Our purchase id, from the object's metadata."""
    return _text(_metadata(obj).get("purchase_id"))


def _session_purchase_id(session: dict[str, Any]) -> str | None:
    """A Checkout Session names our purchase in its metadata or as its `client_reference_id`."""
    return _purchase_id(session) or _text(session.get("client_reference_id"))


def _fulfilled(f: purchases.Fulfilment) -> Handled:
    if f.result is Result.NEEDS_REVIEW:
        return Handled("needs_review", f.reason or "needs review", f.purchase_id)
    return Handled("processed", f.result.value, f.purchase_id)


async def payment_intent_succeeded(
    ctx: Context, conn: AsyncConnection, event_id: str, pi: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """Credit the payment (once)."""
    payment_intent = _text(pi.get("id"))
    received = pi.get("amount_received", pi.get("amount"))
    if payment_intent is None or not isinstance(received, int):
        return Handled("needs_review", "payment intent without an id or an integer amount")
    payment = Payment(
        payment_intent=payment_intent,
        amount_cents=received,
        currency=str(pi.get("currency", "")),
        purchase_id=_purchase_id(pi),
        source=f"stripe_event:{event_id}",
        paid_at=await _event_created(conn, event_id),  # a delivery retried for days keeps its time
    )
    return _fulfilled(await purchases.fulfil_payment(ctx, payment, conn=conn))


async def payment_intent_failed(
    ctx: Context, conn: AsyncConnection, event_id: str, pi: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """Mark the purchase failed (no money moved; a purchase already paid stays paid)."""
    payment_intent = _text(pi.get("id"))
    if payment_intent is None:
        return Handled("needs_review", "payment intent without an id")
    error = pi.get("last_payment_error")
    error = error if isinstance(error, dict) else {}
    purchase = await purchases.fail_payment(
        conn, payment_intent, _purchase_id(pi), _text(error.get("code")), _text(error.get("message"))
    )
    if purchase is None:
        return Handled("needs_review", "no purchase matches this payment")
    return Handled("processed", "payment_failed", purchase)


async def checkout_session_paid(
    ctx: Context, conn: AsyncConnection, event_id: str, session: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`checkout.session.completed` (paid now, or awaiting an asynchronous payment) and
    `checkout.session.async_payment_succeeded`: credit the session's PaymentIntent once."""
    session_id = _text(session.get("id"))
    if session_id is None:
        return Handled("needs_review", "checkout session without an id")
    payment_intent = _id(session.get("payment_intent"))
    purchase_id = _session_purchase_id(session)
    if session.get("payment_status") != "paid":
        found = await purchases.find_purchase(conn, payment_intent, purchase_id)
        if found is None:
            return Handled("needs_review", "no purchase matches this checkout session")
        await purchases.bind_checkout_session(conn, found.id, session_id, payment_intent)
        return Handled("processed", "awaiting_payment", found.id)
    amount = session.get("amount_total")
    if payment_intent is None or not isinstance(amount, int):
        return Handled("needs_review", "paid checkout session without a payment intent or amount")
    payment = Payment(
        payment_intent=payment_intent,
        amount_cents=amount,
        currency=str(session.get("currency", "")),
        purchase_id=purchase_id,
        source=f"stripe_event:{event_id}",
        checkout_session=session_id,
        paid_at=await _event_created(conn, event_id),
    )
    return _fulfilled(await purchases.fulfil_payment(ctx, payment, conn=conn))


async def checkout_session_failed(
    ctx: Context, conn: AsyncConnection, event_id: str, session: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`checkout.session.async_payment_failed`: the purchase failed (no money moved)."""
    purchase = await purchases.fail_payment(
        conn,
        _id(session.get("payment_intent")),
        _session_purchase_id(session),
        "async_payment_failed",
        "The payment did not complete.",
    )
    if purchase is None:
        return Handled("needs_review", "no purchase matches this checkout session")
    return Handled("processed", "payment_failed", purchase)


async def charge_refunded(
    ctx: Context, conn: AsyncConnection, event_id: str, charge: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`charge.refunded`: book what Stripe refunded in total that the ledger has not (a dashboard refund, or
    one the API made but could not record); refunds the API booked change nothing. The charge's `refunds`,
    when the event lists them all, name what is booked (see `reflect_stripe_refunds`)."""
    refunded = charge.get("amount_refunded")
    if not isinstance(refunded, int):
        return Handled("needs_review", "charge without an integer amount_refunded")
    payment_intent = _id(charge.get("payment_intent"))
    amount = charge.get("amount")
    if payment_intent is not None and charge.get("paid") is True and isinstance(amount, int):
        # A refunded charge was paid: if its success event has not arrived yet (Stripe sends events in any
        # order), credit the payment first, through the one fulfilment path — a no-op when already credited.
        fulfilled = await purchases.fulfil_payment(
            ctx,
            Payment(
                payment_intent=payment_intent,
                amount_cents=amount,
                currency=str(charge.get("currency", "")),
                purchase_id=_purchase_id(charge),
                source=f"stripe_event:{event_id}",
                paid_at=_timestamp(charge.get("created")) or await _event_created(conn, event_id),
            ),
            conn=conn,
        )
        if fulfilled.result is Result.NEEDS_REVIEW:
            return _fulfilled(fulfilled)
    reported_at = await _event_created(conn, event_id)
    result = await purchases.reflect_stripe_refunds(
        ctx,
        conn,
        payment_intent=payment_intent,
        purchase_id=_purchase_id(charge),
        amount_refunded_cents=refunded,
        listed=_listed_refunds(charge),  # the cumulative amount is the key; the list, if any, names its parts
        source=f"stripe_event:{event_id}",
        reported_at=reported_at,
    )
    if result.result is Result.NEEDS_REVIEW:
        return Handled("needs_review", result.reason or "needs review", result.purchase_id)
    outcome = "refund_booked" if result.result is Result.CREDITED else "refund_already_booked"
    return Handled("processed", outcome, result.purchase_id)


def _listed_refunds(charge: dict[str, Any]) -> list[refunds.RefundAtStripe] | None:
    """The charge's refunds, when the event lists them all (Stripe elides the list in newer API versions);
    else None."""
    listed = charge.get("refunds")
    if not isinstance(listed, dict) or listed.get("has_more") is not False or not isinstance(listed.get("data"), list):
        return None
    found = [refunds.at_stripe(x) if isinstance(x, dict) else None for x in listed["data"]]
    return [x for x in found if x is not None] if all(found) else None


def _timestamp(value: Any) -> datetime | None:
    """A Stripe timestamp (seconds since the epoch), or None when it is not one."""
    return (
        datetime.fromtimestamp(value, UTC)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0
        else None
    )


async def _event_created(conn: AsyncConnection, event_id: str) -> datetime:
    """When Stripe created the event being handled (its row was inserted in this transaction)."""
    created = await conn.scalar(
        text("SELECT to_timestamp((payload->>'created')::bigint) FROM stripe_events WHERE id = :id"), {"id": event_id}
    )
    return created if created is not None else clock.now()


async def refund_changed(
    ctx: Context, conn: AsyncConnection, event_id: str, obj: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`refund.failed`, `refund.updated`, `charge.refund.updated` (each carries the refund): a refund of ours
    that Stripe reports `failed` or `canceled` gives its credits back, once; any other status changes nothing."""
    amount = obj.get("amount")
    if not isinstance(amount, int) or not isinstance(obj.get("id"), str):
        return Handled("needs_review", "refund without an id or an integer amount")
    refund = purchases.StripeRefund(
        id=obj["id"],
        payment_intent=_id(obj.get("payment_intent")),
        purchase_id=_purchase_id(obj),
        amount_cents=amount,
        status=str(obj.get("status") or ""),
        failure_reason=_text(obj.get("failure_reason")),
        reported_at=await _event_created(conn, event_id),
    )
    result = await purchases.refund_undone(ctx, conn, refund)
    if result.result is Result.NEEDS_REVIEW:
        return Handled("needs_review", result.reason or "needs review", result.purchase_id)
    if result.result is Result.CREDITED:
        return Handled("processed", f"refund_{refund.status}_credits_back", result.purchase_id)
    return Handled("processed", result.reason or "", result.purchase_id)


def _dispute(obj: dict[str, Any]) -> purchases.Dispute | None:
    amount = obj.get("amount")
    if not isinstance(amount, int) or not isinstance(obj.get("id"), str):
        return None
    return purchases.Dispute(
        id=obj["id"],
        payment_intent=_id(obj.get("payment_intent")),
        amount_cents=amount,
        status=str(obj.get("status", "")),
        reason=_text(obj.get("reason")),
    )


async def _credit_disputed_payment(
    ctx: Context, conn: AsyncConnection, event_id: str, dispute: purchases.Dispute, sdk: stripe.StripeClient | None
) -> Handled | None:
    """Only a paid charge can be disputed, but the dispute's event may arrive before the payment's (Stripe
    sends events in any order, and one may be lost). So, as for `charge_refunded`: when the purchase the
    dispute names is not credited yet and Stripe says its PaymentIntent succeeded, the payment is credited
    first, through the one fulfilment path. The dispute carries neither the charge's status nor its amount,
    so Stripe is asked (as the reconciler and support tickets do).

    A dispute is never acknowledged against a payment the ledger has not credited — that is how disputed
    credits were kept: if Stripe cannot be asked, or does not show the payment succeeded, nothing is kept
    and the endpoint answers 503, so Stripe's retry books the dispute once the payment's own event (or the
    reconciler) has credited it. Returns what to answer instead of booking the dispute (fulfilment refused
    the payment: kept for review, as for `charge_refunded`), else None."""
    if dispute.status in purchases.INQUIRY_STATUSES or dispute.payment_intent is None:
        return None
    found = await purchases.find_purchase(conn, dispute.payment_intent, None)
    if found is None or found.status == "succeeded":
        return None
    if sdk is None:
        raise _payment_not_credited(found.public_id, "Stripe cannot be asked (STRIPE_API_KEY is not set)")
    try:
        payment = await retrieve_payment(sdk, dispute.payment_intent)
    except stripe.StripeError as exc:
        raise unavailable(exc) from exc
    if payment is None or payment.status != "succeeded":
        shown = f"Stripe shows it {payment.status}" if payment else "Stripe has no such PaymentIntent"
        raise _payment_not_credited(found.public_id, shown)
    fulfilled = await purchases.fulfil_payment(ctx, payment.to_fulfil(f"stripe_event:{event_id}"), conn=conn)
    return _fulfilled(fulfilled) if fulfilled.result is Result.NEEDS_REVIEW else None


def _payment_not_credited(purchase: str, why: str) -> ApiError:
    return ApiError(
        503,
        API,
        "payment_not_credited",
        f"Disputed purchase {purchase} is not credited yet and {why}: nothing was kept; retry once it is.",
    )


async def dispute_created(
    ctx: Context, conn: AsyncConnection, event_id: str, obj: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`charge.dispute.created`: the disputed money is taken back from the account, once per dispute (the
    payment credited first if its own event has not come yet)."""
    dispute = _dispute(obj)
    if dispute is None:
        return Handled("needs_review", "dispute without an id or an integer amount")
    refused = await _credit_disputed_payment(ctx, conn, event_id, dispute, sdk)
    if refused is not None:
        return refused
    result = await purchases.dispute_opened(ctx, conn, dispute)
    if result.result is Result.NEEDS_REVIEW:
        return Handled("needs_review", result.reason or "needs review", result.purchase_id)
    return Handled(
        "processed", "dispute_booked" if result.result is Result.CREDITED else result.reason or "", result.purchase_id
    )


async def dispute_closed(
    ctx: Context, conn: AsyncConnection, event_id: str, obj: dict[str, Any], sdk: stripe.StripeClient | None
) -> Handled:
    """`charge.dispute.closed`: won gives back what the dispute took, lost keeps it taken back. Arriving before
    the dispute's opening, or the payment's own event, it books them first."""
    dispute = _dispute(obj)
    if dispute is None:
        return Handled("needs_review", "dispute without an id or an integer amount")
    refused = await _credit_disputed_payment(ctx, conn, event_id, dispute, sdk)
    if refused is not None:
        return refused
    result = await purchases.dispute_closed(ctx, conn, dispute)
    if result.result is Result.NEEDS_REVIEW:
        return Handled("needs_review", result.reason or "needs review", result.purchase_id)
    outcome = f"dispute_{dispute.status}" if result.result is Result.CREDITED else result.reason or ""
    return Handled("processed", outcome, result.purchase_id)


HANDLERS: dict[str, Handler] = {
    "charge.dispute.created": dispute_created,
    "charge.dispute.closed": dispute_closed,
    "charge.refunded": charge_refunded,
    "charge.refund.updated": refund_changed,
    "refund.failed": refund_changed,
    "refund.updated": refund_changed,
    "payment_intent.succeeded": payment_intent_succeeded,
    "payment_intent.payment_failed": payment_intent_failed,
    "checkout.session.completed": checkout_session_paid,
    "checkout.session.async_payment_succeeded": checkout_session_paid,
    "checkout.session.async_payment_failed": checkout_session_failed,
}


async def receive(ctx: Context, event: dict[str, Any], sdk: stripe.StripeClient | None) -> Receipt:
    """Record and handle one verified event, exactly once per event id; `sdk` asks Stripe what an event
    does not say (None when payments are not configured)."""
    event_id, type_ = event["id"], event["type"]
    async with ctx.db.begin() as conn:
        claimed = await conn.scalar(
            text(
                "INSERT INTO stripe_events (id, type, status, outcome, payload)"
                " VALUES (:id, :type, 'processed', 'received', CAST(:payload AS jsonb))"
                " ON CONFLICT (id) DO NOTHING RETURNING true"
            ),
            {"id": event_id, "type": type_, "payload": msgspec.json.encode(event).decode()},
        )
        if not claimed:
            row = (
                await conn.execute(text("SELECT status, outcome FROM stripe_events WHERE id = :id"), {"id": event_id})
            ).one()
            return Receipt(event_id, type_, row.status, row.outcome, duplicate=True)
        handler = HANDLERS.get(type_)
        if handler is None:
            handled = Handled("ignored", "event type not handled")
        else:
            handled = await handler(ctx, conn, event_id, event["data"]["object"], sdk)
        await conn.execute(
            text("UPDATE stripe_events SET status = :s, outcome = :o, purchase_id = :p WHERE id = :id"),
            {"s": handled.status, "o": handled.outcome, "p": handled.purchase_id, "id": event_id},
        )
    return Receipt(event_id, type_, handled.status, handled.outcome, duplicate=False)
