"""Disputes (SPEC §5): the disputed money comes back out of the ledger once per dispute, whatever order and
however often Stripe's events arrive; a won dispute gives the credits back once; the account may go negative."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api
from tests.purchases.conftest import buy, pay, spend
from tests.purchases.test_refunds import charge_refunded
from tests.stripe_helpers import UNREACHABLE, event, full_snapshot, pay_at_emulator, signed_headers


def dispute(p: dict[str, Any], status: str, amount_cents: int | None = None, dispute_id: str = "") -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": int(Decimal(p["total"]) * 100) if amount_cents is None else amount_cents,
        "currency": "usd",
        "charge": "ch_" + p["payment_intent"][3:],
        "payment_intent": p["payment_intent"],
        "reason": "fraudulent",
        "status": status,
    }


async def send(client: AsyncTestClient, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
    payload = event(type_, obj)
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200, r.text
    return r.json()


async def paid(api: Api, client: AsyncTestClient, amount: str = "15.00") -> tuple[str, dict[str, Any]]:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, amount))["purchase"]
    await pay(client, p)
    return acct, p


async def dispute_row(engine: AsyncEngine, dispute_id: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT status, amount, fee_amount FROM disputes WHERE stripe_dispute = :d"), {"d": dispute_id}
            )
        ).one()


async def platform_total(engine: AsyncEngine, code: str) -> Decimal:
    async with engine.connect() as conn:
        total = await conn.scalar(
            text(
                "SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN accounts a ON a.id = p.account_id"
                " WHERE a.public_id = :c"
            ),
            {"c": code},
        )
        return Decimal(total)


async def test_dispute_claws_back_once_and_lost_keeps_it(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct, p = await paid(api, client)
    fee_before = await platform_total(engine, "purchase_fee_revenue")
    dp = "dp_" + uuid.uuid4().hex[:14]
    answers = [
        await send(client, "charge.dispute.created", dispute(p, "needs_response", dispute_id=dp)) for _ in range(3)
    ]
    assert [a["outcome"] for a in answers] == ["dispute_booked", "dispute already booked", "dispute already booked"]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("0.00", "0.00")
    row = await dispute_row(engine, dp)
    assert (row.status, row.amount, row.fee_amount) == ("open", Decimal("15"), Decimal("0.83"))
    assert await platform_total(engine, "purchase_fee_revenue") == fee_before - Decimal("0.83")  # the fee went back too
    assert (await send(client, "charge.dispute.closed", dispute(p, "lost", dispute_id=dp)))["outcome"] == "dispute_lost"
    assert (await send(client, "charge.dispute.closed", dispute(p, "lost", dispute_id=dp)))[
        "outcome"
    ] == "dispute is lost"
    assert (await dispute_row(engine, dp)).status == "lost"
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_won_dispute_gives_the_credits_back_once(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct, p = await paid(api, client)
    await spend(api, client, acct, "10.00")  # credits already spent: the dispute drives the account into debt
    dp = "dp_" + uuid.uuid4().hex[:14]
    await send(client, "charge.dispute.created", dispute(p, "needs_response", 1500, dispute_id=dp))
    assert (await api.balance(acct))["balance"] == "-10.00"
    for _ in range(2):
        await send(client, "charge.dispute.closed", dispute(p, "won", 1500, dispute_id=dp))
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("5.00", "15.00")
    assert (await dispute_row(engine, dp)).status == "won"
    lots = (await client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    assert sorted(lot["remaining"] for lot in lots) == ["0.00", "5.00"]  # the new lot paid the debt first


async def test_won_dispute_after_a_fee_only_dispute_gives_the_fee_back(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    """The credits were refunded at Stripe first, so the dispute took only the fee: winning it gives back
    what its opening took, the fee to revenue, and no credits."""
    acct, p = await paid(api, client)  # 15.00 credits + 0.83 fee
    payload = charge_refunded(p, 1500)  # the credits refunded in Stripe's dashboard
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.json()["outcome"] == "refund_booked", r.text
    fee_before = await platform_total(engine, "purchase_fee_revenue")
    dp = "dp_" + uuid.uuid4().hex[:14]
    opened = await send(client, "charge.dispute.created", dispute(p, "needs_response", 83, dispute_id=dp))
    assert opened["outcome"] == "dispute_booked"
    row = await dispute_row(engine, dp)
    assert (row.amount, row.fee_amount) == (Decimal(0), Decimal("0.83"))
    assert await platform_total(engine, "purchase_fee_revenue") == fee_before - Decimal("0.83")
    for outcome in ("dispute_won", "dispute is won"):
        assert (await send(client, "charge.dispute.closed", dispute(p, "won", 83, dispute_id=dp)))["outcome"] == outcome
    assert (await dispute_row(engine, dp)).status == "won"
    assert await platform_total(engine, "purchase_fee_revenue") == fee_before
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("0.00", "0.00")


async def test_closing_event_before_the_opening_one(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct, p = await paid(api, client)
    dp = "dp_" + uuid.uuid4().hex[:14]
    assert (await send(client, "charge.dispute.closed", dispute(p, "won", dispute_id=dp)))["outcome"] == "dispute_won"
    late = await send(client, "charge.dispute.created", dispute(p, "needs_response", dispute_id=dp))
    assert late["outcome"] == "dispute already booked"
    assert (await api.balance(acct))["balance"] == "15.00"
    other = "dp_" + uuid.uuid4().hex[:14]
    assert (await send(client, "charge.dispute.closed", dispute(p, "lost", dispute_id=other)))[
        "outcome"
    ] == "dispute_lost"
    assert (await api.balance(acct))["balance"] == "0.00"


@pytest.mark.parametrize(
    ("type_", "status", "outcome", "balance"),
    [
        ("charge.dispute.created", "needs_response", "dispute_booked", "0.00"),
        ("charge.dispute.closed", "lost", "dispute_lost", "0.00"),
        ("charge.dispute.closed", "won", "dispute_won", "15.00"),
    ],
)
async def test_dispute_arriving_before_the_payment_credits_the_payment_first_then_books_the_dispute(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, type_: str, status: str, outcome: str,
    balance: str,
) -> None:  # fmt: skip
    """Paid at Stripe, but the payment's own event is late or lost: the dispute's event credits it through the
    one fulfilment path first (Stripe says it succeeded), then books the dispute, so the credits taken back
    are never handed out again when the payment event comes."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    dp = "dp_" + uuid.uuid4().hex[:14]
    assert (await send(client, type_, dispute(p, status, dispute_id=dp)))["outcome"] == outcome
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert purchase["status"] == "succeeded"
    assert (await pay(client, p))["outcome"] == "already_credited"  # the late payment event
    assert (await dispute_row(engine, dp)).status == {"needs_response": "open"}.get(status, status)
    assert (await api.balance(acct))["balance"] == balance


async def test_dispute_of_a_payment_neither_credited_nor_shown_paid_is_retried_until_it_is_credited(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    """Never acknowledged against a payment the ledger has not credited (that is how the disputed credits
    were kept): nothing is kept, 503, and Stripe's retry books it once the payment's own event came."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]  # not paid at the emulator either
    dp = "dp_" + uuid.uuid4().hex[:14]
    opened = event("charge.dispute.created", dispute(p, "needs_response", dispute_id=dp))
    before = await full_snapshot(engine)
    r = await client.post("/v1/stripe/webhooks", content=opened, headers=signed_headers(opened))
    assert r.status_code == 503 and r.json()["error"]["code"] == "payment_not_credited", r.text
    assert await full_snapshot(engine) == before
    assert (await pay(client, p))["outcome"] == "credited"
    r = await client.post("/v1/stripe/webhooks", content=opened, headers=signed_headers(opened))  # the retry
    assert r.status_code == 200 and r.json()["outcome"] == "dispute_booked", r.text
    assert (await dispute_row(engine, dp)).status == "open"
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_dispute_of_an_uncredited_payment_while_stripe_cannot_be_asked_keeps_nothing_for_the_retry(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    payload = event("charge.dispute.created", dispute(p, "needs_response", dispute_id="dp_" + uuid.uuid4().hex[:14]))
    monkeypatch.setattr(client.app.state, "stripe", UNREACHABLE)
    before = await full_snapshot(engine)
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 503 and r.json()["error"]["code"] == "stripe_unavailable", r.text
    assert await full_snapshot(engine) == before
    monkeypatch.undo()
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))  # the retry
    assert r.status_code == 200 and r.json()["outcome"] == "dispute_booked", r.text
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_inquiries_and_unknown_payments_move_no_money(api: Api, client: AsyncTestClient) -> None:
    acct, p = await paid(api, client)
    dp = "dp_" + uuid.uuid4().hex[:14]
    answer = await send(client, "charge.dispute.created", dispute(p, "warning_needs_response", dispute_id=dp))
    assert answer["status"] == "processed" and answer["outcome"] == "inquiry: no money moved"
    assert (await api.balance(acct))["balance"] == "15.00"
    stranger = {**dispute(p, "needs_response", dispute_id=dp), "payment_intent": "pi_" + uuid.uuid4().hex[:14]}
    assert (await send(client, "charge.dispute.created", stranger))["status"] == "needs_review"
    assert (await api.balance(acct))["balance"] == "15.00"


async def test_dispute_after_spending_leaves_the_account_negative_and_flagged(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct, p = await paid(api, client)
    await spend(api, client, acct, "12.00")
    account = (await client.get(f"/v1/accounts/{acct}", headers=ADMIN)).json()
    assert account["flagged_for_review"] is False
    dp = "dp_" + uuid.uuid4().hex[:14]
    await send(client, "charge.dispute.created", dispute(p, "needs_response", dispute_id=dp))
    account = (await client.get(f"/v1/accounts/{acct}", headers=ADMIN)).json()
    assert account["flagged_for_review"] is True and account["balance"]["balance"] == "-12.00"
    await send(client, "charge.dispute.closed", dispute(p, "won", dispute_id=dp))
    account = (await client.get(f"/v1/accounts/{acct}", headers=ADMIN)).json()
    assert account["flagged_for_review"] is False and account["balance"]["balance"] == "3.00"
