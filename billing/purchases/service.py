"""Purchases: quotes, buying credits through a Stripe PaymentIntent, and fulfilment.

`fulfil_payment` is the one way a payment becomes credits. The Stripe webhook calls it, and so will the
reconciler and support's "my credits haven't shown up" tickets. It is keyed by the PaymentIntent: the
`fulfilments` row (primary key: the PaymentIntent id) is written in the same statement as the journal
entry, so a payment is credited once however many events or callers point at it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import msgspec
import stripe
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.auth.audit import audit, require_reason
from billing.auth.principal import Principal
from billing.context import Context
from billing.db.journal import Rider
from billing.errors import API, ApiError, from_refusal, invalid, not_found
from billing.idempotency import Outcome, fingerprint, run_once
from billing.ledger import entries, outcomes
from billing.ledger.model import Customer, Entry, EntryKind, LotBalance, Platform
from billing.ledger.money import format_money
from billing.ledger.outcomes import Refused
from billing.organizations.service import authorize, find_account_to_act_for
from billing.purchases import fees, refunds
from billing.purchases import schemas as s
from billing.schemas import ListOf, money_field, public_id, rate_field, storable_text, timestamp_field
from billing.stripe_client import CURRENCY, payment_method_params

log = logging.getLogger("billing.purchases")

MAX_PAGE = 100

PURCHASE_COLUMNS = (
    "p.*, a.public_id AS account_public, l.amount AS lot_amount, l.remaining AS lot_remaining,"
    " l.expires_at AS lot_expires_at, (SELECT coalesce(json_agg(json_build_object('id', r.public_id,"
    " 'amount', r.amount::text, 'fee_amount', r.fee_amount::text, 'source', r.source, 'stripe_refund',"
    " r.stripe_refund, 'entry_id', r.entry_id, 'reason', r.reason, 'created_at', r.created_at, 'status', r.status,"
    " 'failure_reason', r.failure_reason, 'reversal_entry_id', r.reversal_entry_id) ORDER BY r.id),"
    " '[]') FROM refunds r WHERE r.purchase_id = p.id) AS refund_list"
)
PURCHASE_FROM = "purchases p JOIN accounts a ON a.id = p.account_id LEFT JOIN lots l ON l.id = p.lot_id"


# --- pricing ---------------------------------------------------------------------------------------


async def pricing_in_force(conn: AsyncConnection, at: datetime) -> fees.Pricing:
    """The newest pricing version with `effective_from` <= `at`, with its tiers."""
    row = (
        await conn.execute(
            text(
                "SELECT * FROM pricing_versions WHERE effective_from <= :at ORDER BY effective_from DESC, id DESC LIMIT 1"
            ),
            {"at": at},
        )
    ).one()
    return await _pricing(conn, row)


async def _pricing(conn: AsyncConnection, row: Row[Any]) -> fees.Pricing:
    tiers = await conn.execute(
        text("SELECT name, min_volume, fee_discount FROM discount_tiers WHERE pricing_version_id = :id"),
        {"id": row.id},
    )
    return fees.Pricing(
        version_id=row.id,
        effective_from=row.effective_from,
        card_rate=row.card_rate,
        card_minimum=row.card_minimum,
        crypto_rate=row.crypto_rate,
        crypto_minimum=row.crypto_minimum,
        min_purchase=row.min_purchase,
        max_purchase=row.max_purchase,
        volume_window_days=row.volume_window_days,
        tiers=tuple(fees.Tier(t.name, t.min_volume, t.fee_discount) for t in tiers),
    )


async def trailing_volume(conn: AsyncConnection, account_id: int, days: int, now: datetime) -> Decimal:
    """Credits bought by the account in paid purchases over the `days` before `now`."""
    volume = await conn.scalar(
        text(
            "SELECT coalesce(sum(amount), 0) FROM purchases WHERE account_id = :a AND status = 'succeeded'"
            " AND paid_at > :since AND paid_at <= :now"
        ),
        {"a": account_id, "since": now - timedelta(days=days), "now": now},
    )
    return Decimal(volume)


def _rate(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


def _tier(tier: fees.Tier) -> s.TierOut:
    return s.TierOut(name=tier.name, min_volume=format_money(tier.min_volume), fee_discount=_rate(tier.fee_discount))


def quote_view(account: str, q: fees.Quote) -> s.Quote:
    nxt = q.next_tier
    return s.Quote(
        account=account,
        method=q.method.value,
        amount=format_money(q.credits),
        credits=format_money(q.credits),
        fee=format_money(q.fee),
        fee_before_discount=format_money(q.fee_before_discount),
        discount=s.Discount(
            tier=_tier(q.tier) if q.tier else None,
            saving=format_money(q.saving),
            trailing_volume=format_money(q.volume),
            window_days=q.pricing.volume_window_days,
            next_tier=s.NextTier(
                name=nxt.name,
                min_volume=format_money(nxt.min_volume),
                fee_discount=_rate(nxt.fee_discount),
                volume_needed=format_money(nxt.min_volume - q.volume),
            )
            if nxt
            else None,
        ),
        total=format_money(q.total),
        total_cents=q.total_cents,
        currency=CURRENCY,
        pricing_version=public_id("price", q.pricing.version_id),
    )


def _amount(raw: str) -> Decimal:
    """The credits asked for; its sign and size are the pricing rules' to refuse (`fees.quote`)."""
    value = money_field(raw, "amount", negative=None)
    assert value is not None
    return value


async def _quote(conn: AsyncConnection, account_id: int, data: s.CreateQuote | s.CreatePurchase) -> fees.Quote:
    amount = _amount(data.amount)
    now = clock.now()
    pricing = await pricing_in_force(conn, now)
    volume = await trailing_volume(conn, account_id, pricing.volume_window_days, now)
    return fees.quote(pricing, fees.Method(data.method), amount, volume)


async def quote(ctx: Context, principal: Principal, account: str, data: s.CreateQuote) -> s.Quote:
    """What buying `amount` credits would cost this account now. Changes nothing."""
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        try:
            return quote_view(account, await _quote(conn, row.id, data))
        except Refused as refused:
            raise from_refusal(refused) from refused


# --- purchases -------------------------------------------------------------------------------------


def purchase_view(r: Row[Any], now: datetime) -> s.Purchase:
    lot = None
    if r.lot_id is not None:
        lot = s.LotLeft(
            id=public_id("lot", r.lot_id),
            amount=format_money(r.lot_amount),
            remaining=format_money(r.lot_remaining),
            expires_at=r.lot_expires_at,
            expired=r.lot_expires_at <= now,
        )
    return s.Purchase(
        id=r.public_id,
        account=r.account_public,
        method=r.method,
        status=r.status,
        amount=format_money(r.amount),
        credits=format_money(r.amount),
        fee=format_money(r.fee),
        fee_before_discount=format_money(r.fee_before_discount),
        discount_tier=r.discount_tier,
        fee_discount=_rate(r.fee_discount),
        discount_saving=format_money(r.fee_before_discount - r.fee),
        total=format_money(r.total),
        currency=CURRENCY,
        pricing_version=public_id("price", r.pricing_version_id),
        payment_intent=r.payment_intent,
        checkout_session=r.checkout_session,
        lot=lot,
        entry=public_id("je", r.entry_id) if r.entry_id else None,
        failure_code=r.failure_code,
        failure_message=r.failure_message,
        refunded=format_money(
            sum((Decimal(x["amount"]) for x in r.refund_list if x["status"] == "succeeded"), Decimal(0))
        ),
        refunds=[refund_view(x, r.public_id) for x in r.refund_list],
        created_at=r.created_at,
        paid_at=r.paid_at,
    )


def refund_view(r: dict[str, Any], purchase: str) -> s.RefundOut:
    amount, fee = Decimal(r["amount"]), Decimal(r["fee_amount"])
    created = r["created_at"]
    return s.RefundOut(
        id=r["id"],
        purchase=purchase,
        amount=format_money(amount),
        fee_amount=format_money(fee),
        total=format_money(amount + fee),
        source=r["source"],
        stripe_refund=r["stripe_refund"],
        entry=public_id("je", r["entry_id"]),
        reason=r["reason"],
        created_at=created if isinstance(created, datetime) else datetime.fromisoformat(created),
        status=r["status"],
        failure_reason=r["failure_reason"],
        reversal_entry=public_id("je", r["reversal_entry_id"]) if r["reversal_entry_id"] else None,
    )


def purchase_public_id(scope: str, key: str, request_fingerprint: str) -> str:
    """Derived from the idempotency key and the request, so a retry after a failure (Stripe answered, our
    commit did not happen) names the same purchase and gets the same PaymentIntent back from Stripe."""
    digest = hashlib.sha256(f"{scope}\n{key}\n{request_fingerprint}".encode()).hexdigest()
    return "pur_" + digest[:24]


def stripe_unavailable(exc: Exception) -> ApiError:
    return ApiError(
        503, API, "stripe_unavailable", f"Stripe did not accept the payment: {exc}. Nothing was charged; retry."
    )


def refund_not_recorded(stripe_refund: str) -> ApiError:
    return ApiError(
        503,
        API,
        "refund_not_recorded",
        f"Stripe made refund {stripe_refund}, but the ledger could not record it. Retry with the same"
        " Idempotency-Key: Stripe answers with this refund, never a second one.",
    )


async def create_purchase(
    ctx: Context,
    principal: Principal,
    account: str,
    data: s.CreatePurchase,
    *,
    stripe_client: stripe.StripeClient | None,
    idempotency_key: str,
    path: str,
) -> Outcome:
    """Price the purchase, create its Stripe PaymentIntent (purchase id in the metadata, an idempotency key
    derived from ours) and record it `pending`. Credits arrive only with the payment (`fulfil_payment`)."""
    if stripe_client is None:
        raise ApiError(503, API, "stripe_not_configured", "Payments are not configured (STRIPE_API_KEY).")
    _amount(data.amount)  # a malformed amount is a 400 before anything else
    body = msgspec.json.encode(data)
    scope = principal.idempotency_scope
    purchase_id = purchase_public_id(scope, idempotency_key, fingerprint("POST", path, body))

    async def work(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        q = await _quote(conn, row.id, data)
        try:
            intent = await stripe_client.v1.payment_intents.create_async(
                {
                    "amount": q.total_cents,
                    "currency": CURRENCY,
                    **payment_method_params(ctx.settings, q.method.value),  # type: ignore[typeddict-item]
                    "metadata": {
                        "purchase_id": purchase_id,
                        "account": account,
                        "credits": format_money(q.credits),
                        "fee": format_money(q.fee),
                    },
                },
                {"idempotency_key": f"billing-{purchase_id}"},
            )
        except stripe.StripeError as exc:
            raise stripe_unavailable(exc) from exc
        created = (
            await conn.execute(
                text(
                    "WITH p AS (INSERT INTO purchases (public_id, account_id, method, status, amount, fee,"
                    " fee_before_discount, discount_tier, fee_discount, total, pricing_version_id, payment_intent,"
                    " created_by) VALUES (:pid, :a, :m, 'pending', :amount, :fee, :fee0, :tier, :disc, :total, :ver,"
                    " :pi, :by) RETURNING *)"
                    " SELECT p.*, :acct AS account_public, NULL::numeric AS lot_amount, NULL::numeric AS lot_remaining,"
                    " NULL::timestamptz AS lot_expires_at, '[]'::json AS refund_list FROM p"
                ),
                {
                    "pid": purchase_id,
                    "a": row.id,
                    "m": q.method.value,
                    "amount": q.credits,
                    "fee": q.fee,
                    "fee0": q.fee_before_discount,
                    "tier": q.tier.name if q.tier else None,
                    "disc": q.fee_discount,
                    "total": q.total,
                    "ver": q.pricing.version_id,
                    "pi": intent.id,
                    "by": principal.actor,
                    "acct": account,
                },
            )
        ).one()
        result = s.CreatedPurchase(
            purchase=purchase_view(created, clock.now()), client_secret=intent.client_secret or ""
        )
        return 201, msgspec.to_builtins(result)

    async with ctx.db.begin() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        return await run_once(
            conn, scope=scope, key=idempotency_key, method="POST", path=path, canonical_body=body, work=work
        )


async def list_purchases(
    ctx: Context, principal: Principal, account: str, limit: int, starting_after: str | None
) -> ListOf[s.Purchase]:
    """The account's purchases, newest first, with what is left of each one's lot."""
    now = clock.now()
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        cursor = None
        if starting_after:
            cursor = await conn.scalar(
                text("SELECT id FROM purchases WHERE public_id = :p AND account_id = :a"),
                {"p": starting_after, "a": row.id},
            )
            if cursor is None:
                raise not_found("purchase", starting_after)
        rows = (
            await conn.execute(
                text(
                    f"SELECT {PURCHASE_COLUMNS} FROM {PURCHASE_FROM} WHERE p.account_id = :a"
                    " AND (CAST(:cursor AS bigint) IS NULL OR p.id < CAST(:cursor AS bigint))"
                    " ORDER BY p.id DESC LIMIT :n"
                ),
                {"a": row.id, "cursor": cursor, "n": limit + 1},
            )
        ).all()
    return ListOf(data=[purchase_view(r, now) for r in rows[:limit]], has_more=len(rows) > limit)


async def get_purchase(ctx: Context, principal: Principal, purchase: str) -> s.Purchase:
    async with ctx.db.connect() as conn:
        r = await _purchase_row(conn, principal, purchase)
    return purchase_view(r, clock.now())


# --- fulfilment ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment Stripe reports as succeeded, as whoever found it saw it."""

    payment_intent: str
    amount_cents: int
    currency: str
    purchase_id: str | None  # our id from the PaymentIntent's (or Checkout Session's) metadata, if any
    source: str  # who asks: "stripe_event:evt_…", "reconciler", "support:…"
    checkout_session: str | None = None
    # When Stripe says it was paid (its success event's time, or the payment's own): the purchase's time,
    # from which its refund window and its lot's lifetime run however late it is credited (SPEC §5: within
    # 24 hours of the purchase; one year after it). None: now.
    paid_at: datetime | None = None


class Result(StrEnum):
    CREDITED = "credited"
    ALREADY_CREDITED = "already_credited"
    NEEDS_REVIEW = "needs_review"


@dataclass(frozen=True, slots=True)
class Fulfilment:
    result: Result
    purchase_id: int | None = None
    entry_id: int | None = None
    reason: str | None = None


async def fulfil_payment(ctx: Context, payment: Payment, *, conn: AsyncConnection | None = None) -> Fulfilment:
    """Credit a succeeded payment exactly once: one balanced `purchase` entry (a new `paid` lot expiring
    `default_lot_expiry_days` later, the fee to revenue, the charge to Stripe or crypto clearing).

    Runs in `conn`'s transaction when given (the webhook records its event in the same one), else in its
    own. A payment that cannot be matched to a purchase, or does not match it, is never credited: it
    answers `needs_review` and says why.
    """
    if conn is None:
        async with ctx.db.begin() as own:
            return await _fulfil(ctx, own, payment)
    return await _fulfil(ctx, conn, payment)


async def _credited(conn: AsyncConnection, payment_intent: str) -> Fulfilment | None:
    row = (
        await conn.execute(
            text("SELECT purchase_id, entry_id FROM fulfilments WHERE payment_intent = :pi"), {"pi": payment_intent}
        )
    ).first()
    return Fulfilment(Result.ALREADY_CREDITED, row.purchase_id, row.entry_id) if row else None


async def find_purchase(conn: AsyncConnection, payment_intent: str | None, purchase_id: str | None) -> Row[Any] | None:
    """The purchase a payment belongs to: by its PaymentIntent first, else by our id in the metadata."""
    if payment_intent:
        row = (
            await conn.execute(text("SELECT * FROM purchases WHERE payment_intent = :pi"), {"pi": payment_intent})
        ).first()
        if row is not None:
            return row
    if purchase_id:
        return (await conn.execute(text("SELECT * FROM purchases WHERE public_id = :p"), {"p": purchase_id})).first()
    return None


async def mark_for_review(conn: AsyncConnection, purchase: int, reason: str) -> None:
    await conn.execute(
        text(
            "UPDATE purchases SET status = 'needs_review', review_reason = :r, updated_at = now()"
            " WHERE id = :id AND status <> 'succeeded'"
        ),
        {"id": purchase, "r": reason},
    )


async def _fulfil(ctx: Context, conn: AsyncConnection, payment: Payment) -> Fulfilment:
    done = await _credited(conn, payment.payment_intent)
    if done:
        return done
    found = await find_purchase(conn, payment.payment_intent, payment.purchase_id)
    if found is None:
        return Fulfilment(Result.NEEDS_REVIEW, reason="no purchase matches this payment")
    # Lock order: the customer's balance row, then the purchase (then its lots, in the journal).
    state = await ctx.journal.lock_customer(conn, Customer(found.account_id))
    purchase = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id FOR UPDATE"), {"id": found.id})).one()
    done = await _credited(conn, payment.payment_intent)  # another caller may have won the lock
    if done:
        return done
    if purchase.status == "succeeded":
        reason = f"purchase {purchase.public_id} was already paid by {purchase.payment_intent}; this payment is extra"
        return Fulfilment(Result.NEEDS_REVIEW, purchase.id, reason=reason)
    if purchase.payment_intent not in (None, payment.payment_intent) and payment.checkout_session is None:
        reason = f"payment {payment.payment_intent} names purchase {purchase.public_id} of {purchase.payment_intent}"
        return Fulfilment(Result.NEEDS_REVIEW, purchase.id, reason=reason)
    expected = fees.to_cents(purchase.total)
    if payment.amount_cents != expected or payment.currency.lower() != CURRENCY:
        reason = (
            f"paid {payment.amount_cents} {payment.currency} but purchase {purchase.public_id} charges"
            f" {expected} {CURRENCY}"
        )
        await mark_for_review(conn, purchase.id, reason)
        return Fulfilment(Result.NEEDS_REVIEW, purchase.id, reason=reason)

    now = clock.now()
    paid = min(payment.paid_at, now) if payment.paid_at is not None else now
    lifetime = timedelta(days=ctx.settings.default_lot_expiry_days)
    if paid + lifetime <= now:
        # Its credits would arrive already expired: a payment this old is for a person to settle.
        reason = (
            f"paid at {paid.isoformat()}, longer ago than a lot lives ({lifetime.days} days):"
            " its credits would arrive already expired"
        )
        await mark_for_review(conn, purchase.id, reason)
        return Fulfilment(Result.NEEDS_REVIEW, purchase.id, reason=reason)
    entry = entries.purchase(
        Customer(purchase.account_id),
        credits=purchase.amount,
        fee=purchase.fee,
        method=purchase.method,
        expires_at=paid + lifetime,
        debt=state.debt,
        purchase_id=purchase.public_id,
        payment_intent=payment.payment_intent,
    )
    riders = [
        Rider(
            "fulfilment",
            "INSERT INTO fulfilments (payment_intent, purchase_id, entry_id, amount_cents, source)"
            " SELECT :f_pi, :f_purchase, e.id, :f_cents, :f_source FROM e",
            {
                "f_pi": payment.payment_intent,
                "f_purchase": purchase.id,
                "f_cents": expected,
                "f_source": payment.source,
            },
        ),
        Rider(
            "paid",
            "UPDATE purchases SET status = 'succeeded', entry_id = (SELECT id FROM e), lot_id = (SELECT id FROM nl),"
            " paid_at = :pu_at, payment_intent = :pu_pi, checkout_session = coalesce(:pu_cs, checkout_session),"
            " failure_code = NULL, failure_message = NULL, review_reason = NULL, updated_at = now()"
            " WHERE id = :pu_id",
            {"pu_at": paid, "pu_pi": payment.payment_intent, "pu_cs": payment.checkout_session, "pu_id": purchase.id},
        ),
    ]
    posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=riders)
    return Fulfilment(Result.CREDITED, purchase.id, posted.entry_id)


async def fail_payment(
    conn: AsyncConnection, payment_intent: str | None, purchase_id: str | None, code: str | None, message: str | None
) -> int | None:
    """Record a failed payment on its purchase (no money moved). A purchase already paid stays paid: a late
    failure event never undoes a success. Returns the purchase's id, or None when no purchase matches."""
    found = await find_purchase(conn, payment_intent, purchase_id)
    if found is None:
        return None
    await conn.execute(
        text(
            "UPDATE purchases SET status = 'failed', failure_code = :c, failure_message = :m, updated_at = now()"
            " WHERE id = :id AND status IN ('pending', 'failed')"
        ),
        {"id": found.id, "c": code, "m": message},
    )
    return int(found.id)


async def bind_checkout_session(conn: AsyncConnection, purchase: int, session: str, payment_intent: str | None) -> None:
    """A Checkout Session paying a purchase, still awaiting an asynchronous payment: remember both ids."""
    await conn.execute(
        text(
            "UPDATE purchases SET checkout_session = :cs, payment_intent = coalesce(:pi, payment_intent),"
            " updated_at = now() WHERE id = :id AND status IN ('pending', 'failed')"
        ),
        {"id": purchase, "cs": session, "pi": payment_intent},
    )


# --- pricing versions (admin) ----------------------------------------------------------------------


def _parse_amount(raw: str, field: str) -> Decimal:
    value = money_field(raw, field)
    assert value is not None
    return value


def pricing_view(row: Row[Any], pricing: fees.Pricing) -> s.PricingVersion:
    return s.PricingVersion(
        id=public_id("price", pricing.version_id),
        effective_from=pricing.effective_from,
        card_rate=_rate(pricing.card_rate),
        card_minimum=format_money(pricing.card_minimum),
        crypto_rate=_rate(pricing.crypto_rate),
        crypto_minimum=format_money(pricing.crypto_minimum),
        min_purchase=format_money(pricing.min_purchase),
        max_purchase=format_money(pricing.max_purchase),
        volume_window_days=pricing.volume_window_days,
        tiers=[_tier(t) for t in sorted(pricing.tiers, key=lambda t: t.min_volume)],
        created_by=row.created_by,
        created_at=row.created_at,
    )


async def create_pricing_version(ctx: Context, principal: Principal, data: s.CreatePricingVersion) -> s.PricingVersion:
    """A new version of the purchase rules from `effective_from`; purchases priced before keep theirs. Audit-logged
    with the admin who added it and why (SPEC §7)."""
    effective_from = timestamp_field(data.effective_from, "effective_from")
    amounts = {
        field: _parse_amount(getattr(data, field), field)
        for field in ("min_purchase", "max_purchase", "card_minimum", "crypto_minimum")
    }
    for field, value in amounts.items():
        if not fees.is_whole_cents(value):
            raise invalid("amount_not_whole_cents", f"`{field}` is charged in whole cents: at most 2 decimals.", field)
    low, high = amounts["min_purchase"], amounts["max_purchase"]
    values = {
        "t": effective_from,
        "cr": rate_field(data.card_rate, "card_rate", upto_one=False),
        "cm": amounts["card_minimum"],
        "xr": rate_field(data.crypto_rate, "crypto_rate", upto_one=False),
        "xm": amounts["crypto_minimum"],
        "lo": low,
        "hi": high,
        "w": data.volume_window_days,
        "by": principal.actor,
    }
    if low <= 0 or high < low:
        raise invalid("invalid_purchase_bounds", "Need 0 < `min_purchase` <= `max_purchase`.", "min_purchase")
    tiers = [
        (
            t.name,
            _parse_amount(t.min_volume, "tiers.min_volume"),
            rate_field(t.fee_discount, "tiers.fee_discount", upto_one=True),
        )
        for t in data.tiers
    ]
    if len({v for _, v, _ in tiers}) != len(tiers):
        raise invalid("duplicate_tier", "Two tiers start at the same `min_volume`.", "tiers")
    async with ctx.db.begin() as conn:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO pricing_versions (effective_from, card_rate, card_minimum, crypto_rate, crypto_minimum,"
                    " min_purchase, max_purchase, volume_window_days, created_by)"
                    " VALUES (:t, :cr, :cm, :xr, :xm, :lo, :hi, :w, :by) RETURNING *"
                ),
                values,
            )
        ).one()
        for name, volume, discount in tiers:
            await conn.execute(
                text(
                    "INSERT INTO discount_tiers (pricing_version_id, name, min_volume, fee_discount)"
                    " VALUES (:v, :n, :m, :d)"
                ),
                {"v": row.id, "n": name, "m": volume, "d": discount},
            )
        version = pricing_view(row, await _pricing(conn, row))
        await audit(conn, principal, "pricing_version.create", reason=data.reason, details=msgspec.to_builtins(version))
        return version


async def list_pricing_versions(ctx: Context) -> ListOf[s.PricingVersion]:
    async with ctx.db.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM pricing_versions ORDER BY effective_from DESC, id DESC"))).all()
        return ListOf(data=[pricing_view(r, await _pricing(conn, r)) for r in rows], has_more=False)


# --- refunds ---------------------------------------------------------------------------------------


async def _purchase_row(conn: AsyncConnection, principal: Principal, purchase: str) -> Row[Any]:
    r = (
        await conn.execute(
            text(f"SELECT {PURCHASE_COLUMNS} FROM {PURCHASE_FROM} WHERE p.public_id = :p"), {"p": purchase}
        )
    ).first()
    if r is None:
        raise not_found("purchase", purchase)
    await authorize(conn, principal, r.account_id, "purchase", purchase)
    return r


async def _lot(conn: AsyncConnection, lot_id: int | None) -> LotBalance | None:
    if lot_id is None:
        return None
    row = (await conn.execute(text("SELECT id, remaining, expires_at FROM lots WHERE id = :id"), {"id": lot_id})).one()
    return LotBalance(row.id, row.remaining, row.expires_at)


def _refund_rider(
    *, public: str, purchase: int, account: int, credits: Decimal, fee: Decimal, source: str,
    stripe_refund: str | None, reason: str | None, actor: str, reported_at: datetime | None = None,
) -> Rider:  # fmt: skip
    return Rider(
        "refund",
        "INSERT INTO refunds (public_id, purchase_id, account_id, amount, fee_amount, amount_cents, source,"
        " stripe_refund, entry_id, reason, created_by, reported_at) SELECT :r_pub, :r_purchase, :r_account,"
        " :r_amount, :r_fee, :r_cents, :r_source, :r_stripe, e.id, :r_reason, :r_by, :r_reported FROM e",
        {
            "r_pub": public,
            "r_purchase": purchase,
            "r_account": account,
            "r_amount": credits,
            "r_fee": fee,
            "r_cents": fees.to_cents(credits + fee),
            "r_source": source,
            "r_stripe": stripe_refund,
            "r_reason": reason,
            "r_by": actor,
            "r_reported": reported_at,
        },
    )


# Refunds of one purchase through the API take turns, for as long as the transaction lasts. An advisory lock,
# not the purchase's row: `reflect_stripe_refunds` locks the account and then that row, and a refund waiting
# on Stripe must hold nothing either of them needs.
_REFUNDS_TAKE_TURNS = text("SELECT pg_advisory_xact_lock(hashtextextended('purchase refunds ' || :purchase, 0))")
# The purchase's last booking before a refund is asked of Stripe: only later ones can hold that refund.
_LAST_BOOKING = text("SELECT coalesce(max(id), 0) FROM refunds WHERE purchase_id = :purchase")


def _api_refund_entry(
    customer: Customer, *, credits: Decimal, lot: LotBalance | None, lots: Sequence[LotBalance], now: datetime,
    purchase_id: str, reason: str | None, actor: str,
) -> Entry:  # fmt: skip
    """The entry of a refund Stripe made for the API: out of the purchase's lot, as the rules checked; what
    the gateway spent of that lot while Stripe was refunding is clawed back from other lots, then as debt."""
    if lot is not None and lot.expires_at > now and lot.remaining >= credits:
        return entries.refund(
            customer, credits=credits, lot=lot.id, purchase_id=purchase_id, reason=reason, actor=actor
        )
    taken = entries.clawback(
        customer, credits=credits, fee=Decimal(0), purchase_lot=lot, lots=lots, now=now, to=Platform.REFUNDS,
        kind=EntryKind.REFUND, description=f"refund of {format_money(credits)} USD of purchase {purchase_id}"
        " (partly spent while Stripe refunded it)",
    )  # fmt: skip
    return replace(taken, reason=reason, actor=actor)


async def refund_purchase(
    ctx: Context,
    principal: Principal,
    purchase: str,
    data: s.CreateRefund,
    *,
    stripe_client: stripe.StripeClient | None,
    idempotency_key: str,
    path: str,
) -> Outcome:
    """Refund unused credits of a card purchase within 24 hours, to its payment method, never the fee
    (SPEC §5). Stripe refunds first (idempotently), then one `refund` entry takes the credits out of the
    purchase's lot, in the same transaction; a refund by staff writes its `audit_log` row (actor, reason) in
    that transaction too (SPEC §7).

    Stripe is asked without the account's lock: every gateway call on the account — and with it the whole
    batch that call shares with other accounts — would wait on that lock for Stripe's round trips. Refunds of
    one purchase take turns instead (a transaction-level advisory lock), so each checks the rules against what
    the one before it left; the account is locked only to book. Credits the gateway spent from the lot while
    Stripe was refunding them are clawed back as a refund made at Stripe is (other lots, then debt: the
    account may go negative, SPEC §5) — Stripe has refunded them, so the ledger books all of it.

    A 4xx always means no money moved: every input — the amount, the refund rules, text the database could
    not store (`reason`) — is checked before Stripe is asked to refund. Once Stripe has refunded, nothing is answered
    as a 4xx, which would invite a corrected request and so a second refund: a failure to record the refund
    rolls the transaction back and answers 503 `refund_not_recorded`. A retry with the same Idempotency-Key
    gets the same Stripe refund (Stripe's idempotency key is derived from ours) and records it; without one,
    Stripe's `charge.refunded` event reflects it through `reflect_stripe_refunds`, as it does should the
    commit itself fail, so the ledger still ends up right.

    A Stripe refund is booked once, whichever of this and that event records it first. So Stripe is first
    asked for the purchase's refunds: one an earlier attempt of this request made (its metadata names our
    refund) is not made again, nor checked against the rules again (they held when it was made, and the
    event may have taken its credits since). If the event booked it (`_booking_of`: an earlier attempt's
    refund, or this attempt's, whose event can arrive before the account is locked), the answer is that
    booking and nothing is booked here; else it is booked here, unless it failed at Stripe meanwhile: a 409
    `refund_failed`, no money moved. Every refund booked here names its Stripe refund, unique in `refunds`.
    """
    if stripe_client is None:
        raise ApiError(503, API, "stripe_not_configured", "Payments are not configured (STRIPE_API_KEY).")
    requested = None if data.amount is None else _amount(data.amount)
    storable_text(data.reason, "reason")
    require_reason(principal, data.reason)
    body = msgspec.json.encode(data)
    scope = principal.idempotency_scope
    refund_id = "ref_" + purchase_public_id(scope, idempotency_key, fingerprint("POST", path, body))[4:]

    async def work(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        await conn.execute(_REFUNDS_TAKE_TURNS, {"purchase": found.id})
        p = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id"), {"id": found.id})).one()
        now = clock.now()
        listed: list[refunds.RefundAtStripe] = []
        if p.status == "succeeded" and p.method == "card" and p.payment_intent:  # else Stripe refunded nothing
            try:
                listed = await refunds_at_stripe(stripe_client, p.payment_intent)
            except stripe.StripeError as exc:
                raise stripe_unavailable(exc) from exc
        made = next((r for r in listed if r.refund_id == refund_id), None)
        booked_after = 0  # an earlier attempt's refund: any booking since may hold it
        if made is None:
            booked_after = await conn.scalar(_LAST_BOOKING, {"purchase": p.id})
            lot = await _lot(conn, p.lot_id)  # as it is now; spending goes on beside this (see above)
            credits = refunds.refundable(
                status=p.status,
                method=p.method,
                paid_at=p.paid_at,
                now=now,
                lot_remaining=lot.remaining if lot else Decimal(0),
                lot_expired=lot is not None and lot.expires_at <= now,
                requested=requested,
            )
            try:
                answer = await stripe_client.v1.refunds.create_async(
                    {
                        "payment_intent": p.payment_intent,
                        "amount": fees.to_cents(credits),
                        "metadata": {"purchase_id": p.public_id, "refund_id": refund_id},
                    },
                    {"idempotency_key": f"billing-{refund_id}"},
                )
            except stripe.StripeError as exc:
                raise stripe_unavailable(exc) from exc
            made = refunds.at_stripe(answer.to_dict())
            if made is None:  # Stripe refunded, but its answer lacks what the booking names
                raise refund_not_recorded(answer.id)
        stripe_refund, credits = made.id, fees.from_cents(made.amount_cents)
        try:
            state = await ctx.journal.lock_customer(conn, Customer(found.account_id))
            p = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id FOR UPDATE"), {"id": found.id})).one()
            holder = await _booking_of(conn, p.id, made, booked_after)
        except Exception as exc:
            raise refund_not_recorded(stripe_refund) from exc
        if holder is None and not made.counts:
            raise Refused(
                outcomes.REFUND_FAILED,
                f"Stripe's refund {stripe_refund} for this request is {made.status}: nothing was refunded."
                " Send a new request, with a new Idempotency-Key, to refund again.",
                stripe_refund=stripe_refund,
            )
        try:
            if holder is None:
                entry = _api_refund_entry(
                    Customer(p.account_id), credits=credits, lot=await _lot(conn, p.lot_id), lots=state.lots,
                    now=now, purchase_id=p.public_id, reason=data.reason, actor=principal.actor,
                )  # fmt: skip
                rider = _refund_rider(
                    public=refund_id, purchase=p.id, account=p.account_id, credits=credits, fee=Decimal(0),
                    source="api", stripe_refund=stripe_refund, reason=data.reason, actor=principal.actor,
                )  # fmt: skip
                posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=[rider])
                if principal.is_staff:
                    await audit(
                        conn,
                        principal,
                        "refund",
                        account_id=p.account_id,
                        entry_id=posted.entry_id,
                        reason=data.reason,
                        details={"purchase": p.public_id, "refund": refund_id, "amount": format_money(credits)},
                    )
            fresh = await _purchase_row(conn, principal, purchase)
        except Exception as exc:  # Stripe has refunded: never the caller's fault from here on (see above)
            log.error("refund %s made at Stripe as %s, not recorded", refund_id, stripe_refund, exc_info=exc)
            raise refund_not_recorded(stripe_refund) from exc
        view = purchase_view(fresh, now)
        [made_view] = [x for x in view.refunds if x.id == (holder or refund_id)]
        return 201, msgspec.to_builtins(s.RefundCreated(refund=made_view, purchase=view))

    async with ctx.db.begin() as conn:
        found = await _purchase_row(conn, principal, purchase)
        return await run_once(
            conn, scope=scope, key=idempotency_key, method="POST", path=path, canonical_body=body, work=work
        )


async def refunds_at_stripe(sdk: stripe.StripeClient, payment_intent: str) -> list[refunds.RefundAtStripe]:
    """Every refund Stripe holds of the PaymentIntent's charge, as it shows them now."""
    page = await sdk.v1.refunds.list_async({"payment_intent": payment_intent, "limit": 100})
    listed = []
    async for obj in page.auto_paging_iter():
        refund = refunds.at_stripe(obj.to_dict())
        if refund is not None:
            listed.append(refund)
    return listed


async def _booking_of(
    conn: AsyncConnection, purchase: int, refund: refunds.RefundAtStripe, booked_after: int = 0
) -> str | None:
    """The booking that holds Stripe refund `refund` of the purchase (its public id), or None.

    One under its Stripe id. Else the first booking without an id from a `charge.refunded` Stripe created at
    or after the refund (`reported_at`): that event's cumulative amount counted the refund, and the booking
    brought the ledger up to it. `created` is in whole seconds, so an event of the same second counts as
    after: at worst the refund is not booked here but by its own `charge.refunded`, which Stripe creates
    after it — never twice. For a refund just made, only bookings since it was asked for (`booked_after`: the
    purchase's last booking then) can hold it."""
    return await conn.scalar(
        text(
            "SELECT public_id FROM refunds WHERE purchase_id = :p AND (stripe_refund = :s OR (stripe_refund IS NULL"
            " AND status = 'succeeded' AND reported_at >= :made AND id > :after))"
            " ORDER BY stripe_refund IS NULL, id LIMIT 1"
        ),
        {"p": purchase, "s": refund.id, "made": refund.created, "after": booked_after},
    )


async def reflect_stripe_refunds(
    ctx: Context, conn: AsyncConnection, *, payment_intent: str | None, purchase_id: str | None,
    amount_refunded_cents: int, listed: Sequence[refunds.RefundAtStripe] | None, source: str,
    reported_at: datetime,
) -> Fulfilment:  # fmt: skip
    """Bring the ledger up to what Stripe says was refunded on a payment in total (`charge.refunded`
    carries the cumulative amount, so repeats and re-ordered events change nothing). What the ledger has
    not booked yet — a refund made in Stripe's dashboard — is clawed back: credits first (the purchase's
    lot, then other lots, then debt), then the fee (fee revenue reversed).

    A refund that failed no longer counts in Stripe's cumulative amount once it has failed, but still does in
    an event Stripe created before the failure (`reported_at`, the event's `created`): so a failed refund is
    compared as booked exactly for events older than its failure, and a late, stale event never books it
    again.

    Each Stripe refund is booked once, whichever of this and the API (`refund_purchase`) records it first.
    When the event lists the charge's refunds (`listed`), what is missing is booked under the Stripe ids of
    the refunds it is made of (`refunds.named_in`), one entry each: the unique key on `refunds.stripe_refund`
    then refuses a second booking of any of them. Otherwise it is one booking without an id, marked with
    `reported_at`, by which the API recognises a refund of its own that the event counted."""
    found = await find_purchase(conn, payment_intent, purchase_id)
    if found is None:
        return Fulfilment(Result.NEEDS_REVIEW, reason="no purchase matches this refund")
    state = await ctx.journal.lock_customer(conn, Customer(found.account_id))
    p = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id FOR UPDATE"), {"id": found.id})).one()
    if p.status != "succeeded":
        return Fulfilment(Result.NEEDS_REVIEW, p.id, reason=f"refund of purchase {p.public_id}, which is {p.status}")
    booked = (
        await conn.execute(
            text(
                "SELECT coalesce(sum(amount), 0) AS credits, coalesce(sum(fee_amount), 0) AS fee,"
                " coalesce(sum(amount_cents), 0) AS cents FROM refunds WHERE purchase_id = :id"
                " AND (status = 'succeeded' OR failed_at >= :reported)"
            ),
            {"id": p.id, "reported": reported_at},
        )
    ).one()
    missing = amount_refunded_cents - int(booked.cents)
    if missing <= 0:
        return Fulfilment(Result.ALREADY_CREDITED, p.id, reason="refund already in the ledger")
    if amount_refunded_cents > fees.to_cents(p.total):
        return Fulfilment(Result.NEEDS_REVIEW, p.id, reason=f"Stripe refunded more than purchase {p.public_id} charged")
    named = None
    if listed is not None:
        ids = await conn.scalars(
            text("SELECT stripe_refund FROM refunds WHERE purchase_id = :id AND stripe_refund IS NOT NULL"),
            {"id": p.id},
        )
        named = refunds.named_in(missing, listed, set(ids))
    parts = [(r.id, r.amount_cents) for r in named] if named else [(None, missing)]
    taken = booked.credits
    for stripe_refund, cents in parts:
        money = fees.from_cents(cents)
        credits = min(money, p.amount - taken)
        fee = money - credits
        taken += credits
        entry = entries.clawback(
            Customer(p.account_id), credits=credits, fee=fee, purchase_lot=await _lot(conn, p.lot_id),
            lots=state.lots, now=clock.now(), to=Platform.REFUNDS, kind=EntryKind.REFUND,
            description=f"refund {stripe_refund + ' ' if stripe_refund else ''}of {format_money(money)} USD"
            f" of purchase {p.public_id} made at Stripe",
        )  # fmt: skip
        seed = stripe_refund or f"{source}\n{p.id}\n{amount_refunded_cents}"
        rider = _refund_rider(
            public="ref_" + hashlib.sha256(seed.encode()).hexdigest()[:24], purchase=p.id,
            account=p.account_id, credits=credits, fee=fee, source="stripe", stripe_refund=stripe_refund,
            reason="refunded at Stripe", actor=source, reported_at=reported_at,
        )  # fmt: skip
        posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=[rider])
        state = await ctx.journal.lock_customer(conn, Customer(p.account_id))  # as that entry left it
    return Fulfilment(Result.CREDITED, p.id, posted.entry_id)


@dataclass(frozen=True, slots=True)
class StripeRefund:
    """A Stripe refund as its events (`refund.*`, `charge.refund.updated`) describe it."""

    id: str
    payment_intent: str | None
    purchase_id: str | None  # our purchase id from the refund's metadata, if we made it
    amount_cents: int
    status: str
    failure_reason: str | None
    reported_at: datetime  # the event's `created`: when Stripe said so


async def refund_undone(ctx: Context, conn: AsyncConnection, refund: StripeRefund) -> Fulfilment:
    """A refund Stripe could not complete (`failed`) or called off (`canceled`): the credits it took come
    back once — `entries.refund_failed`, a reversal of the refund entry into the lot it took them from —
    and the refund is marked so. Any other status, a repeat, or an event after the refund already failed
    changes nothing.

    Only a refund the API booked under its Stripe id (its entry took credits from the purchase's lot alone) is
    put back. A failed refund booked from `charge.refunded` — without an id, through the cumulative amount,
    or under its id when the event listed it — took credits from several lots, debt and perhaps the fee: it is
    not guessed at, but kept for review, and support corrects the balance with an audited adjustment.
    """
    if refund.status not in refunds.UNDONE:
        return Fulfilment(Result.ALREADY_CREDITED, reason=f"refund is {refund.status or 'unknown'}: nothing to undo")
    found = await find_purchase(conn, refund.payment_intent, refund.purchase_id)
    if found is None:
        return Fulfilment(Result.NEEDS_REVIEW, reason="no purchase matches this refund")
    # Lock order: the balance row (an API refund still committing holds it), then the refund row.
    state = await ctx.journal.lock_customer(conn, Customer(found.account_id))
    r = (
        await conn.execute(
            text("SELECT * FROM refunds WHERE stripe_refund = :s AND purchase_id = :p FOR UPDATE"),
            {"s": refund.id, "p": found.id},
        )
    ).first()
    if r is None:
        return Fulfilment(
            Result.NEEDS_REVIEW, found.id, reason=f"{refund.status} refund {refund.id} was never booked by the ledger"
        )
    if r.status != "succeeded":
        return Fulfilment(Result.ALREADY_CREDITED, found.id, r.reversal_entry_id, reason=f"refund already {r.status}")
    if r.source != "api":
        return Fulfilment(
            Result.NEEDS_REVIEW, found.id, reason=f"{refund.status} refund {refund.id} was booked from Stripe's event"
        )
    if refund.amount_cents != r.amount_cents or r.fee_amount != 0:
        return Fulfilment(
            Result.NEEDS_REVIEW,
            found.id,
            reason=f"refund {refund.id} of {refund.amount_cents} cents does not match the booked {r.amount_cents}",
        )
    p = (await conn.execute(text("SELECT public_id, lot_id FROM purchases WHERE id = :id"), {"id": found.id})).one()
    lot = await _lot(conn, p.lot_id)
    assert lot is not None  # an API refund is only ever of a paid purchase, which has its lot
    entry = entries.refund_failed(
        Customer(r.account_id), credits=r.amount, lot=lot, debt=state.debt, now=clock.now(), reverses=r.entry_id,
        description=f"refund {r.public_id} of purchase {p.public_id} {refund.status} at Stripe: credits back",
    )  # fmt: skip
    rider = Rider(
        "undone",
        "UPDATE refunds SET status = :u_status, failure_reason = :u_reason, failed_at = :u_at,"
        " reversal_entry_id = (SELECT id FROM e) WHERE id = :u_id AND status = 'succeeded'",
        {"u_status": refund.status, "u_reason": refund.failure_reason, "u_at": refund.reported_at, "u_id": r.id},
    )
    posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=[rider])
    return Fulfilment(Result.CREDITED, found.id, posted.entry_id)


# --- disputes --------------------------------------------------------------------------------------

# Inquiries: Stripe has withdrawn no money, so the ledger does not move.
INQUIRY_STATUSES = frozenset({"warning_needs_response", "warning_under_review", "warning_closed"})


@dataclass(frozen=True, slots=True)
class Dispute:
    """A Stripe dispute as its events describe it."""

    id: str
    payment_intent: str | None
    amount_cents: int
    status: str
    reason: str | None


async def dispute_opened(ctx: Context, conn: AsyncConnection, dispute: Dispute) -> Fulfilment:
    """Claw the disputed money back once per dispute (SPEC §5): credits from the purchase's lot, other lots,
    then debt (the account may go negative); a disputed part beyond the credits reverses fee revenue."""
    if dispute.status in INQUIRY_STATUSES:
        return Fulfilment(Result.ALREADY_CREDITED, reason="inquiry: no money moved")
    found = await find_purchase(conn, dispute.payment_intent, None)
    if found is None:
        return Fulfilment(Result.NEEDS_REVIEW, reason="no purchase matches this dispute")
    state = await ctx.journal.lock_customer(conn, Customer(found.account_id))
    p = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id FOR UPDATE"), {"id": found.id})).one()
    known = (
        await conn.execute(text("SELECT id, entry_id FROM disputes WHERE stripe_dispute = :d"), {"d": dispute.id})
    ).first()
    if known is not None:
        return Fulfilment(Result.ALREADY_CREDITED, p.id, known.entry_id, reason="dispute already booked")
    if p.status != "succeeded":
        return Fulfilment(Result.NEEDS_REVIEW, p.id, reason=f"dispute of purchase {p.public_id}, which is {p.status}")
    taken = (
        await conn.execute(
            text(
                "SELECT coalesce(sum(amount), 0) AS credits, coalesce(sum(fee_amount), 0) AS fee FROM ("
                " SELECT amount, fee_amount FROM refunds WHERE purchase_id = :id AND status = 'succeeded' UNION ALL"
                " SELECT amount, fee_amount FROM disputes WHERE purchase_id = :id AND status <> 'won') x"
            ),
            {"id": p.id},
        )
    ).one()
    money = fees.from_cents(dispute.amount_cents)
    credits = min(money, p.amount - taken.credits)
    fee = money - credits
    if credits < 0 or fee > p.fee - taken.fee or money <= 0:
        return Fulfilment(Result.NEEDS_REVIEW, p.id, reason=f"dispute exceeds what purchase {p.public_id} has left")
    lot = await _lot(conn, p.lot_id)
    entry = entries.clawback(
        Customer(p.account_id), credits=credits, fee=fee, purchase_lot=lot, lots=state.lots, now=clock.now(),
        to=Platform.DISPUTES, kind=EntryKind.DISPUTE,
        description=f"dispute {dispute.id} of purchase {p.public_id}: {format_money(money)} USD taken back",
    )  # fmt: skip
    rider = Rider(
        "dispute",
        "INSERT INTO disputes (stripe_dispute, purchase_id, account_id, amount, fee_amount, status, reason, entry_id)"
        " SELECT :d_id, :d_purchase, :d_account, :d_amount, :d_fee, 'open', :d_reason, e.id FROM e",
        {
            "d_id": dispute.id,
            "d_purchase": p.id,
            "d_account": p.account_id,
            "d_amount": credits,
            "d_fee": fee,
            "d_reason": dispute.reason,
        },
    )
    posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=[rider])
    return Fulfilment(Result.CREDITED, p.id, posted.entry_id)


async def dispute_closed(ctx: Context, conn: AsyncConnection, dispute: Dispute) -> Fulfilment:
    """`won`: give back what the clawback took, once; `lost`: the clawback stands. A closing event that
    arrives before the opening one books the opening first, so the order of events does not matter."""
    if dispute.status in INQUIRY_STATUSES:
        return Fulfilment(Result.ALREADY_CREDITED, reason="inquiry: no money moved")
    opened = await dispute_opened(
        ctx, conn, Dispute(dispute.id, dispute.payment_intent, dispute.amount_cents, "open", dispute.reason)
    )
    if opened.result is Result.NEEDS_REVIEW:
        return opened
    row = (
        await conn.execute(text("SELECT * FROM disputes WHERE stripe_dispute = :d FOR UPDATE"), {"d": dispute.id})
    ).one()
    if row.status != "open" or dispute.status not in ("won", "lost"):
        return Fulfilment(Result.ALREADY_CREDITED, row.purchase_id, reason=f"dispute is {row.status}")
    if dispute.status == "lost":
        await conn.execute(
            text("UPDATE disputes SET status = 'lost', closed_at = now() WHERE id = :id"), {"id": row.id}
        )
        return Fulfilment(Result.CREDITED, row.purchase_id, row.entry_id)
    state = await ctx.journal.lock_customer(conn, Customer(row.account_id))
    p = (await conn.execute(text("SELECT * FROM purchases WHERE id = :id"), {"id": row.purchase_id})).one()
    lot = await _lot(conn, p.lot_id)
    entry = entries.dispute_won(
        Customer(row.account_id), credits=row.amount, fee=row.fee_amount,
        expires_at=lot.expires_at if lot else clock.now() + timedelta(days=ctx.settings.default_lot_expiry_days),
        debt=state.debt, reverses=row.entry_id,
        description=(
            f"dispute {dispute.id} of purchase {p.public_id} won:"
            f" {format_money(row.amount + row.fee_amount)} USD given back"
        ),
    )  # fmt: skip
    rider = Rider(
        "won",
        "UPDATE disputes SET status = 'won', reinstated_entry_id = (SELECT id FROM e), closed_at = now()"
        " WHERE id = :w_id",
        {"w_id": row.id},
    )
    posted = await ctx.journal.post(conn, entry, balance_before=state.balance, riders=[rider])
    return Fulfilment(Result.CREDITED, row.purchase_id, posted.entry_id)
