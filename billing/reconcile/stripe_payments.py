"""Reading payments back from Stripe, for the reconciler, support tickets and a dispute whose payment the
ledger has not credited yet (its webhook).

Stripe lists PaymentIntents newest first and takes a `created[gte]` filter, so a window is a bounded
walk with the SDK's pagination (`auto_paging_iter`, `starting_after` under the hood). The local emulator
(`localstripe`) lists oldest first and refuses any filter but `limit` and `starting_after`, so against it
(`STRIPE_API_BASE` set) the whole list is walked and the window applied here; the window is always
applied here too, so both behave the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import stripe

from billing.errors import API, ApiError
from billing.purchases.service import Payment
from billing.settings import Settings

PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class StripePayment:
    """A PaymentIntent as Stripe shows it now."""

    id: str
    status: str  # succeeded, processing, requires_payment_method, canceled, ...
    amount_cents: int  # what was received (or, before payment, what is asked)
    currency: str
    created: datetime
    purchase_id: str | None  # our purchase id, from the metadata we set
    account: str | None  # our account id, from the metadata we set
    failure_code: str | None = None
    failure_message: str | None = None
    paid: datetime | None = None  # its successful charge's time, when Stripe showed the charge

    def to_fulfil(self, source: str, checkout_session: str | None = None) -> Payment:
        """What `fulfil_payment` is handed for this payment, by whoever found it."""
        return Payment(
            payment_intent=self.id,
            amount_cents=self.amount_cents,
            currency=self.currency,
            purchase_id=self.purchase_id,
            source=source,
            checkout_session=checkout_session,
            # When it was paid: its successful charge's time, as the webhook path takes its event's (which
            # Stripe sends as the charge succeeds), so the refund window and the lot's lifetime are the same
            # whichever path credits it. Without the charge, the PaymentIntent's creation: a lower bound,
            # minutes before the payment at a checkout, far closer than whenever a lost webhook's payment is found.
            paid_at=self.paid or (self.created if self.created.timestamp() > 0 else None),  # (0: Stripe gave none)
        )


def _plain(obj: Any) -> dict[str, Any]:
    """An SDK object as plain data (the SDK's objects are not dicts)."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return dict(meta) if isinstance(meta, dict) else {}


def paid_time(pi: dict[str, Any]) -> datetime | None:
    """When the PaymentIntent was paid: its latest charge's creation, when that charge is shown (expanded:
    `latest_charge` is only an id unless the request asked for the object) and succeeded; else None."""
    charge = pi.get("latest_charge")
    if not isinstance(charge, dict) or charge.get("status") != "succeeded":
        return None
    created = charge.get("created")
    return datetime.fromtimestamp(created, UTC) if isinstance(created, int) and created > 0 else None


def payment_of(sdk_object: Any) -> StripePayment:
    pi = _plain(sdk_object)
    received = pi.get("amount_received")
    amount = received if isinstance(received, int) and received > 0 else pi.get("amount")
    error = pi.get("last_payment_error") or {}
    meta = _meta(pi)
    return StripePayment(
        id=pi["id"],
        status=str(pi.get("status") or ""),
        amount_cents=int(amount or 0),
        currency=str(pi.get("currency") or ""),
        created=datetime.fromtimestamp(int(pi.get("created") or 0), UTC),
        purchase_id=meta.get("purchase_id"),
        account=meta.get("account"),
        failure_code=error.get("decline_code") or error.get("code"),
        failure_message=error.get("message"),
        paid=paid_time(pi),
    )


def unavailable(exc: Exception) -> ApiError:
    return ApiError(503, API, "stripe_unavailable", f"Stripe could not be asked: {exc}. Nothing was changed; retry.")


async def payments_since(sdk: stripe.StripeClient, settings: Settings, since: datetime) -> AsyncIterator[StripePayment]:
    """Every PaymentIntent created at or after `since`, in the order Stripe lists them (newest first)."""
    params: dict[str, Any] = {"limit": PAGE_SIZE, "expand": ["data.latest_charge"]}
    if not settings.stripe_api_base:  # the emulator refuses the filter (see the module's docstring)
        params["created"] = {"gte": int(since.timestamp())}
    page = await sdk.v1.payment_intents.list_async(params)  # type: ignore[arg-type]
    async for pi in page.auto_paging_iter():
        payment = payment_of(pi)
        if payment.created >= since:
            yield payment


async def retrieve_payment(sdk: stripe.StripeClient, payment_intent: str) -> StripePayment | None:
    """The PaymentIntent, or None when Stripe has no such object."""
    try:
        return payment_of(await sdk.v1.payment_intents.retrieve_async(payment_intent, {"expand": ["latest_charge"]}))
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            return None
        raise


@dataclass(frozen=True, slots=True)
class StripeSession:
    """A Checkout Session as Stripe shows it now."""

    id: str
    status: str  # open, complete, expired
    payment_status: str  # paid, unpaid, no_payment_required
    payment_intent: str | None
    amount_cents: int
    currency: str
    purchase_id: str | None
    account: str | None


async def retrieve_session(sdk: stripe.StripeClient, session: str) -> StripeSession | None:
    """The Checkout Session, or None when Stripe has no such object."""
    try:
        cs = _plain(await sdk.v1.checkout.sessions.retrieve_async(session))
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            return None
        raise
    pi = cs.get("payment_intent")
    if isinstance(pi, dict):
        pi = pi.get("id")
    meta = _meta(cs)
    return StripeSession(
        id=cs["id"],
        status=str(cs.get("status") or ""),
        payment_status=str(cs.get("payment_status") or ""),
        payment_intent=pi if isinstance(pi, str) and pi else None,
        amount_cents=int(cs.get("amount_total") or 0),
        currency=str(cs.get("currency") or ""),
        purchase_id=meta.get("purchase_id") or cs.get("client_reference_id"),
        account=meta.get("account"),
    )
