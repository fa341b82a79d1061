"""Support tickets for missing credits (SPEC §5 "Missing credits", §2 support staff).

Support opens a ticket for an account with a Stripe PaymentIntent or Checkout Session id, or a time
window. The service asks Stripe about the payment(s) there and then, and resolves the ticket in the same
transaction:

- `credited`: Stripe shows it paid and the ledger had not credited it; it is credited now, through
  `fulfil_payment` (the webhook's and the reconciler's function, keyed by the PaymentIntent: once);
- `already_credited`: paid, and the ledger had it;
- `not_paid`: declined or never charged (`requires_payment_method`, `requires_confirmation`, `canceled`, an
  open or expired Checkout Session): the customer should try another card. A decline is also recorded on
  the purchase (`failed`, with Stripe's code), in case its webhook was lost too;
- `wrong_account`: the payment belongs to another account (named in the ticket); nothing is changed;
- `needs_review`: anything a person must look at: Stripe has no such payment, it is still processing, no
  purchase matches it, or fulfilment refused it (another amount, a purchase paid twice).

A window looks at every payment of the account created in it (Stripe's, by our `metadata.account`, and the
account's purchases); the ticket takes the first of `needs_review`, `credited`, `already_credited`,
`wrong_account`, `not_paid` that any of them had, and no payment at all is `not_paid`.

The ticket keeps what was found (each payment: Stripe's status and amount, the purchase, the outcome),
who opened it and when. Opening one may move money, so it needs an `Idempotency-Key`; a retry answers
the same ticket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import stripe
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.accounts.service import find_account
from billing.auth.principal import Principal
from billing.context import Context
from billing.db.engine import CUSTOM_PLANS
from billing.errors import API, ApiError, invalid, not_found
from billing.idempotency import Outcome, run_once
from billing.ledger.money import format_money
from billing.purchases.fees import from_cents
from billing.purchases.service import Result, fail_payment, find_purchase, fulfil_payment
from billing.reconcile.stripe_payments import (
    StripePayment,
    payments_since,
    retrieve_payment,
    retrieve_session,
    unavailable,
)
from billing.schemas import ListOf, internal_id, public_id, timestamp_field
from billing.support import schemas as s

CREDITED = "credited"
ALREADY_CREDITED = "already_credited"
NOT_PAID = "not_paid"
WRONG_ACCOUNT = "wrong_account"
NEEDS_REVIEW = "needs_review"
STATUSES = (CREDITED, ALREADY_CREDITED, NOT_PAID, WRONG_ACCOUNT, NEEDS_REVIEW)
# A ticket over a window of several payments is named by the first of these any payment had.
PRECEDENCE = (NEEDS_REVIEW, CREDITED, ALREADY_CREDITED, WRONG_ACCOUNT, NOT_PAID)
# PaymentIntent statuses in which no money was taken: declined, or never confirmed.
NOT_CHARGED = frozenset({"requires_payment_method", "requires_confirmation", "canceled"})
MAX_WINDOW = timedelta(days=31)
MAX_ID_LENGTH = 255
MAX_PAGE = 100


@dataclass(frozen=True, slots=True)
class Resolved:
    payment: s.TicketPayment
    purchase_id: int | None = None
    entry_id: int | None = None


def _stripe_id(raw: str | None, prefix: str, field: str) -> str | None:
    if raw is None:
        return None
    if not raw.startswith(prefix) or len(raw) > MAX_ID_LENGTH or not raw.isprintable() or " " in raw:
        raise invalid(f"invalid_{field}", f"`{field}` must be a Stripe id starting with {prefix!r}.", field)
    return raw


def _validate(data: s.CreateTicket) -> tuple[str | None, str | None, tuple[datetime, datetime] | None]:
    pi = _stripe_id(data.payment_intent, "pi_", "payment_intent")
    cs = _stripe_id(data.checkout_session, "cs_", "checkout_session")
    window = None
    if data.created_after is not None or data.created_before is not None:
        start, end = data.created_after, data.created_before
        if start is None or end is None:
            raise invalid("incomplete_window", "Give both `created_after` and `created_before`.", "created_after")
        if start.tzinfo is None or end.tzinfo is None:
            raise invalid("timestamp_without_zone", "Timestamps need a time zone, e.g. `Z`.", "created_after")
        start, end = timestamp_field(start, "created_after"), timestamp_field(end, "created_before")
        if not start < end <= start + MAX_WINDOW:
            raise invalid(
                "invalid_window", "`created_after` must be before `created_before`, at most 31 days apart.",
                "created_before",
            )  # fmt: skip
        window = (start, end)
    if (pi is not None) + (cs is not None) + (window is not None) != 1:
        raise invalid(
            "one_payment_reference",
            "Give exactly one of `payment_intent`, `checkout_session`, or `created_after` with `created_before`.",
        )
    return pi, cs, window


async def _account_public(conn: AsyncConnection, account_id: int) -> str:
    return str(await conn.scalar(text("SELECT public_id FROM accounts WHERE id = :id"), {"id": account_id}))


async def _resolve(
    ctx: Context,
    conn: AsyncConnection,
    account: Row[Any],
    payment: StripePayment,
    actor: str,
    *,
    shown_status: str | None = None,
    checkout_session: str | None = None,
) -> Resolved:
    """One payment Stripe knows: whose it is, whether it was paid, and credit it (once) if it was."""
    found = await find_purchase(conn, payment.id, payment.purchase_id)
    owner = await _account_public(conn, found.account_id) if found is not None else payment.account

    def out(result: str, reason: str | None, entry: int | None = None) -> Resolved:
        view = s.TicketPayment(
            payment_intent=payment.id,
            checkout_session=checkout_session,
            stripe_status=shown_status or payment.status,
            amount=format_money(from_cents(payment.amount_cents)),
            currency=payment.currency,
            purchase=found.public_id if found is not None else payment.purchase_id,
            account=owner,
            result=result,
            reason=reason,
            entry=public_id("je", entry) if entry else None,
            failure_code=payment.failure_code,
            failure_message=payment.failure_message,
        )
        return Resolved(view, found.id if found is not None else None, entry)

    if owner is not None and owner != account.public_id:
        return out(WRONG_ACCOUNT, f"the payment belongs to account {owner}")
    if payment.status == "succeeded":
        done = await fulfil_payment(ctx, payment.to_fulfil(f"support:{actor}", checkout_session), conn=conn)
        if done.result is Result.CREDITED:
            return out(CREDITED, "paid at Stripe and missing from the ledger: credited now", done.entry_id)
        if done.result is Result.ALREADY_CREDITED:
            return out(ALREADY_CREDITED, "paid at Stripe and already credited", done.entry_id)
        return out(NEEDS_REVIEW, done.reason)
    if payment.status in NOT_CHARGED:
        if payment.failure_code or payment.failure_message:
            await fail_payment(conn, payment.id, payment.purchase_id, payment.failure_code, payment.failure_message)
            return out(NOT_PAID, f"declined: {payment.failure_message or payment.failure_code}; try another card")
        return out(NOT_PAID, f"never charged (Stripe: {shown_status or payment.status}); try again or another card")
    return out(NEEDS_REVIEW, f"the payment is {shown_status or payment.status} at Stripe, not paid yet")


def _missing(payment_intent: str | None, what: str, ident: str, checkout_session: str | None = None) -> Resolved:
    return Resolved(
        s.TicketPayment(
            payment_intent=payment_intent, checkout_session=checkout_session, stripe_status=None, amount=None,
            currency=None, purchase=None, account=None, result=NEEDS_REVIEW, reason=f"Stripe has no {what} {ident}",
        )
    )  # fmt: skip


async def _by_session(
    ctx: Context, conn: AsyncConnection, sdk: stripe.StripeClient, account: Row[Any], cs: str, actor: str
) -> Resolved:
    session = await retrieve_session(sdk, cs)
    if session is None:
        return _missing(None, "Checkout Session", cs, checkout_session=cs)
    if session.payment_status in ("paid", "no_payment_required") and session.payment_intent:
        status = "succeeded"
    elif session.status in ("open", "expired"):
        status = "canceled"  # never completed: nothing was charged
    else:
        status = "processing"  # completed, the asynchronous payment still under way
    payment = StripePayment(
        id=session.payment_intent or cs, status=status, amount_cents=session.amount_cents, currency=session.currency,
        created=clock.now(), purchase_id=session.purchase_id, account=session.account,
    )  # fmt: skip
    shown = f"{session.status}/{session.payment_status}"
    return await _resolve(ctx, conn, account, payment, actor, shown_status=shown, checkout_session=cs)


async def _by_window(
    ctx: Context,
    conn: AsyncConnection,
    sdk: stripe.StripeClient,
    account: Row[Any],
    window: tuple[datetime, datetime],
    actor: str,
) -> list[Resolved]:
    start, end = window
    found: dict[str, StripePayment] = {}
    async for payment in payments_since(sdk, ctx.settings, start):
        if payment.created <= end and payment.account == account.public_id:
            found[payment.id] = payment
    ours = await conn.scalars(
        text(
            "SELECT payment_intent FROM purchases WHERE account_id = :a AND payment_intent IS NOT NULL"
            " AND created_at >= :start AND created_at <= :end ORDER BY id"
        ),
        {"a": account.id, "start": start, "end": end},
    )
    resolved = []
    for pi in ours.all():
        if pi not in found:
            looked_up = await retrieve_payment(sdk, pi)
            if looked_up is None:
                resolved.append(_missing(pi, "PaymentIntent", pi))
                continue
            found[pi] = looked_up
    for payment in found.values():
        resolved.append(await _resolve(ctx, conn, account, payment, actor))
    return resolved


def _decide(resolved: list[Resolved], window: tuple[datetime, datetime] | None) -> tuple[str, str, Resolved | None]:
    if not resolved:
        assert window is not None
        return NOT_PAID, f"no payment for this account at Stripe between {window[0]} and {window[1]}", None
    for status in PRECEDENCE:
        for r in resolved:
            if r.payment.result == status:
                reason = r.payment.reason or status
                if len(resolved) > 1:
                    reason = f"{r.payment.payment_intent}: {reason} ({len(resolved)} payments looked at)"
                return status, reason, r
    raise AssertionError("every payment has one of the statuses")


TICKET_COLUMNS = "t.*, a.public_id AS account_public, p.public_id AS purchase_public"
TICKET_FROM = "support_tickets t JOIN accounts a ON a.id = t.account_id LEFT JOIN purchases p ON p.id = t.purchase_id"


# Planned for its values (`CUSTOM_PLANS`): then a filter left out folds away and the page walks `(account_id, id)`
# or `(status, id)` back from the cursor; the generic plan kept both indexes out and walked every ticket back
# from the newest (19,998 of 20,000 rows to list a quiet account's, session 22).
TICKETS = text(
    f"SELECT {TICKET_COLUMNS} FROM {TICKET_FROM} WHERE (CAST(:status AS text) IS NULL OR t.status = :status)"
    " AND (CAST(:a AS bigint) IS NULL OR t.account_id = :a)"
    " AND (CAST(:cursor AS bigint) IS NULL OR t.id < :cursor) ORDER BY t.id DESC LIMIT :n"
)


def ticket_view(r: Row[Any]) -> s.Ticket:
    return s.Ticket(
        id=public_id("tkt", r.id),
        account=r.account_public,
        status=r.status,
        resolution=r.resolution,
        payment_intent=r.payment_intent,
        checkout_session=r.checkout_session,
        window=s.Window(r.window_start, r.window_end) if r.window_start else None,
        purchase=r.purchase_public,
        entry=public_id("je", r.entry_id) if r.entry_id else None,
        payments=msgspec.convert(r.findings, list[s.TicketPayment]),
        note=r.note,
        created_by=r.created_by,
        created_at=r.created_at,
        resolved_at=r.resolved_at,
    )


async def open_ticket(
    ctx: Context,
    principal: Principal,
    data: s.CreateTicket,
    *,
    stripe_client: stripe.StripeClient | None,
    idempotency_key: str,
    path: str,
) -> Outcome:
    """Open a ticket and resolve it now: ask Stripe, credit what is paid and missing (once), record it."""
    if stripe_client is None:
        raise ApiError(503, API, "stripe_not_configured", "Payments are not configured (STRIPE_API_KEY).")
    sdk = stripe_client
    pi, cs, window = _validate(data)
    body = msgspec.json.encode(data)
    actor = principal.actor

    async def work(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        try:
            if pi is not None:
                payment = await retrieve_payment(sdk, pi)
                resolved = [
                    await _resolve(ctx, conn, account, payment, actor) if payment else _missing(pi, "PaymentIntent", pi)
                ]
            elif cs is not None:
                resolved = [await _by_session(ctx, conn, sdk, account, cs, actor)]
            else:
                assert window is not None
                resolved = await _by_window(ctx, conn, sdk, account, window, actor)
        except stripe.StripeError as exc:
            raise unavailable(exc) from exc
        status, resolution, decided = _decide(resolved, window)
        ticket_id = await conn.scalar(
            text(
                "INSERT INTO support_tickets (account_id, payment_intent, checkout_session, window_start, window_end,"
                " note, status, resolution, findings, purchase_id, entry_id, created_by, resolved_at)"
                " VALUES (:a, :pi, :cs, :ws, :we, :note, :status, :resolution, CAST(:findings AS jsonb), :purchase,"
                " :entry, :by, clock_timestamp()) RETURNING id"
            ),
            {
                "a": account.id,
                "pi": pi,
                "cs": cs,
                "ws": window[0] if window else None,
                "we": window[1] if window else None,
                "note": data.note,
                "status": status,
                "resolution": resolution,
                "findings": msgspec.json.encode([r.payment for r in resolved]).decode(),
                "purchase": decided.purchase_id if decided else None,
                "entry": decided.entry_id if decided else None,
                "by": actor,
            },
        )
        row = (
            await conn.execute(text(f"SELECT {TICKET_COLUMNS} FROM {TICKET_FROM} WHERE t.id = :id"), {"id": ticket_id})
        ).one()
        return 201, msgspec.to_builtins(ticket_view(row))

    async with ctx.db.begin() as conn:
        account = await find_account(conn, principal, data.account)
        return await run_once(
            conn, scope=principal.idempotency_scope, key=idempotency_key, method="POST", path=path,
            canonical_body=body, work=work,
        )  # fmt: skip


async def get_ticket(ctx: Context, ticket: str) -> s.Ticket:
    ident = internal_id("tkt", ticket, "support_ticket")
    async with ctx.db.connect() as conn:
        row = (
            await conn.execute(text(f"SELECT {TICKET_COLUMNS} FROM {TICKET_FROM} WHERE t.id = :id"), {"id": ident})
        ).first()
    if row is None:
        raise not_found("support_ticket", ticket)
    return ticket_view(row)


async def list_tickets(
    ctx: Context, principal: Principal, *, status: str | None, account: str | None, limit: int,
    starting_after: str | None,
) -> ListOf[s.Ticket]:  # fmt: skip
    """Tickets newest first, by status and/or account."""
    if status is not None and status not in STATUSES:
        raise invalid("invalid_status", f"`status` must be one of {', '.join(STATUSES)}.", "status")
    cursor = internal_id("tkt", starting_after, "support_ticket") if starting_after else None
    async with ctx.db.connect() as conn:
        account_id = (await find_account(conn, principal, account)).id if account else None
        await conn.exec_driver_sql(CUSTOM_PLANS)
        rows = (
            await conn.execute(TICKETS, {"status": status, "a": account_id, "cursor": cursor, "n": limit + 1})
        ).all()
    return ListOf(data=[ticket_view(r) for r in rows[:limit]], has_more=len(rows) > limit)
