"""Stripe webhooks, in-process: signature on the raw body, dedup on event id, each handled type, and a
payment credited exactly once however often and from however many events it is reported (SPEC §2, §5)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.ledger.money import format_money
from tests.conftest import ADMIN, Api
from tests.purchases.conftest import buy
from tests.stripe_helpers import checkout_session, event, full_snapshot, payment_intent, sign, signed_headers

HOOK = "/v1/stripe/webhooks"


def cents(purchase: dict[str, Any]) -> int:
    return int(Decimal(purchase["total"]) * 100)


async def deliver(client: AsyncTestClient, payload: bytes, **sign_kwargs: Any) -> Any:
    return await client.post(HOOK, content=payload, headers=signed_headers(payload, **sign_kwargs))


async def entries_for(engine: AsyncEngine, purchase_id: str) -> list[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT a.public_id, p.amount FROM purchases pu JOIN postings p ON p.entry_id = pu.entry_id"
                " JOIN accounts a ON a.id = p.account_id WHERE pu.public_id = :p ORDER BY p.id"
            ),
            {"p": purchase_id},
        )
        return [(r[0], format_money(r[1])) for r in rows]


async def purchase(client: AsyncTestClient, purchase_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/purchases/{purchase_id}", headers=ADMIN)
    assert r.status_code == 200
    return r.json()


async def event_row(engine: AsyncEngine, payload: bytes) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                text("SELECT status, outcome, purchase_id FROM stripe_events WHERE id = :id"),
                {"id": json.loads(payload)["id"]},
            )
        ).first()


async def test_succeeded_credits_one_balanced_entry_with_a_paid_lot(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    payload = event("payment_intent.succeeded", payment_intent(p["payment_intent"], 1583, p["id"]))
    r = await deliver(client, payload)
    assert r.status_code == 200 and r.json()["outcome"] == "credited" and r.json()["duplicate"] is False
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("15.00", "15.00")
    assert await entries_for(engine, p["id"]) == [
        (acct, "15.00"),
        ("purchase_fee_revenue", "0.83"),
        ("stripe_clearing", "-15.83"),
    ]
    paid = await purchase(client, p["id"])
    assert paid["status"] == "succeeded" and paid["lot"]["remaining"] == "15.00"
    lots = (await client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    assert [(lot["category"], lot["amount"]) for lot in lots] == [("paid", "15.00")]
    from datetime import datetime

    expires = datetime.fromisoformat(lots[0]["expires_at"])
    created = datetime.fromisoformat(paid["paid_at"])
    assert expires - created == timedelta(days=365)


async def test_crypto_purchase_posts_to_crypto_clearing(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "5.10", method="crypto"))["purchase"]
    assert p["total"] == "5.36"
    r = await deliver(client, event("payment_intent.succeeded", payment_intent(p["payment_intent"], 536, p["id"])))
    assert r.json()["outcome"] == "credited"
    assert await entries_for(engine, p["id"]) == [
        (acct, "5.10"),
        ("purchase_fee_revenue", "0.26"),
        ("crypto_clearing", "-5.36"),
    ]


async def test_purchase_pays_off_debt_first(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    await api.grant(acct, "1.00")
    gateway = await api.token(["gateway"])
    r = await client.post(
        "/v1/holds", json={"request_id": uuid.uuid4().hex, "account": acct, "amount": "0.50"}, headers=gateway
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/holds/{r.json()['id']}/capture", json={"generation_id": uuid.uuid4().hex, "cost": "3.00"}, headers=gateway
    )
    assert r.status_code == 200, r.text
    assert (await api.balance(acct))["balance"] == "-2.00"  # a finished generation overran into debt
    p = (await buy(client, acct, "10"))["purchase"]
    await deliver(client, event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"])))
    assert (await api.balance(acct))["balance"] == "8.00"
    assert (await purchase(client, p["id"]))["lot"]["remaining"] == "8.00"  # the lot paid the debt first


async def test_same_event_ten_times_credits_once(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "50"))["purchase"]
    payload = event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"]))
    answers = [await deliver(client, payload) for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert [a.json()["duplicate"] for a in answers] == [False] + [True] * 9
    assert {a.json()["outcome"] for a in answers} == {"credited"}
    assert (await api.balance(acct))["balance"] == "50.00"
    assert len(await entries_for(engine, p["id"])) == 3


async def test_concurrent_deliveries_and_different_events_for_one_payment_credit_once(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "25000"))["purchase"]
    same = event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"]))
    # other events about the same payment: Stripe's retries get new signatures, a second event id for the
    # same PaymentIntent (as after an event re-send), and the Checkout Session that paid it
    other_ids = [
        event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"])) for _ in range(5)
    ]
    session = checkout_session(p["payment_intent"], cents(p), p["id"])
    completed = [event("checkout.session.completed", session) for _ in range(5)]
    payloads = [same] * 10 + other_ids + completed
    answers = await asyncio.gather(*(deliver(client, payload) for payload in payloads))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    fresh = [a.json()["outcome"] for a in answers if not a.json()["duplicate"]]
    assert len(fresh) == 11  # one per distinct event id; the other 9 were recognised as duplicates
    assert sorted(fresh) == ["already_credited"] * 10 + ["credited"]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("25000.00", "25000.00")
    async with engine.connect() as conn:
        n = await conn.scalar(
            text(
                "SELECT count(*) FROM journal_entries e JOIN accounts a ON a.id = e.account_id"
                " WHERE a.public_id = :a AND e.kind = 'purchase'"
            ),
            {"a": acct},
        )
        assert n == 1
        fulfilments = await conn.scalar(
            text("SELECT count(*) FROM fulfilments WHERE payment_intent = :pi"), {"pi": p["payment_intent"]}
        )
        assert fulfilments == 1


@pytest.mark.parametrize("tamper", ["body", "signature", "secret", "stale", "future_missing_v1", "no_header"])
async def test_bad_signatures_are_refused_and_change_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, tamper: str
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    payload = event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"]))
    headers = signed_headers(payload)
    body = payload
    if tamper == "body":
        body = payload.replace(b'"amount": 1080', b'"amount": 9999')
        assert body != payload
    elif tamper == "signature":
        headers["Stripe-Signature"] = headers["Stripe-Signature"][:-4] + "0000"
    elif tamper == "secret":
        headers["Stripe-Signature"] = sign(payload, secret="whsec_someone_else")
    elif tamper == "stale":
        headers["Stripe-Signature"] = sign(payload, timestamp=int(time.time()) - 301)
    elif tamper == "future_missing_v1":
        headers["Stripe-Signature"] = f"t={int(time.time())}"
    else:
        del headers["Stripe-Signature"]
    before = await full_snapshot(engine)
    r = await client.post(HOOK, content=body, headers=headers)
    assert r.status_code == 400, r.text
    expected = {"stale": "signature_too_old", "no_header": "missing_signature"}.get(tamper, "invalid_signature")
    assert r.json()["error"]["code"] == expected
    assert await full_snapshot(engine) == before
    # the genuine event still works afterwards (nothing was recorded for its id)
    assert (await deliver(client, payload)).json()["outcome"] == "credited"


async def test_unknown_event_type_is_recorded_and_changes_nothing(client: AsyncTestClient, engine: AsyncEngine) -> None:
    before = await full_snapshot(engine)
    payload = event("customer.created", {"id": "cus_123", "object": "customer"})
    r = await deliver(client, payload)
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    after = await full_snapshot(engine)
    assert after["counts"]["stripe_events"] == before["counts"]["stripe_events"] + 1
    after["counts"]["stripe_events"] = before["counts"]["stripe_events"]
    assert after == before
    assert (await event_row(engine, payload)).status == "ignored"


async def test_event_for_unknown_purchase_is_kept_for_review(client: AsyncTestClient, engine: AsyncEngine) -> None:
    before = await full_snapshot(engine)
    payload = event("payment_intent.succeeded", payment_intent(f"pi_{uuid.uuid4().hex[:14]}", 1000, "pur_nope"))
    r = await deliver(client, payload)
    assert r.status_code == 200 and r.json()["status"] == "needs_review"
    row = await event_row(engine, payload)
    assert row.status == "needs_review" and "no purchase" in row.outcome
    after = await full_snapshot(engine)
    assert after["money"] == before["money"] and after["counts"]["postings"] == before["counts"]["postings"]


async def test_amount_mismatch_is_not_credited_and_kept_for_review(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    payload = event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p) - 1, p["id"]))
    r = await deliver(client, payload)
    assert r.json()["status"] == "needs_review"
    assert (await purchase(client, p["id"]))["status"] == "needs_review"
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_payment_failed_marks_the_purchase_and_never_undoes_a_success(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    failed = payment_intent(
        p["payment_intent"],
        cents(p),
        p["id"],
        status="requires_payment_method",
        last_payment_error={"code": "card_declined", "message": "Your card was declined."},
    )
    r = await deliver(client, event("payment_intent.payment_failed", failed))
    assert r.json()["outcome"] == "payment_failed"
    got = await purchase(client, p["id"])
    assert (got["status"], got["failure_code"]) == ("failed", "card_declined")
    assert (await api.balance(acct))["balance"] == "0.00"
    # the customer retries with another card on the same PaymentIntent: it succeeds
    await deliver(client, event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"])))
    assert (await purchase(client, p["id"]))["status"] == "succeeded"
    # a late (re-ordered) failure event does not undo it
    await deliver(client, event("payment_intent.payment_failed", failed))
    got = await purchase(client, p["id"])
    assert (got["status"], got["failure_code"]) == ("succeeded", None)
    assert (await api.balance(acct))["balance"] == "10.00"


@pytest.mark.parametrize(
    ("type_", "status"),
    [
        ("payment_intent.succeeded", "succeeded"),
        ("payment_intent.payment_failed", "requires_payment_method"),
        ("checkout.session.completed", "paid"),
        ("checkout.session.completed", "unpaid"),
    ],
)
async def test_an_event_whose_object_lacks_its_id_is_kept_for_review_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, type_: str, status: str
) -> None:
    """Signed, so not a 400 for a bad signature, and never a 5xx that Stripe retries for days: the handler
    checks the fields it uses and keeps the event `needs_review`, as for any other event it cannot apply."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    if type_.startswith("checkout"):
        obj = checkout_session(p["payment_intent"], cents(p), p["id"], payment_status=status)
    else:
        obj = payment_intent(p["payment_intent"], cents(p), p["id"], status=status)
    del obj["id"]
    before = await full_snapshot(engine)
    payload = event(type_, obj)
    r = await deliver(client, payload)
    assert r.status_code == 200 and r.json()["status"] == "needs_review", r.text
    assert "without an id" in (await event_row(engine, payload)).outcome
    after = await full_snapshot(engine)
    assert after["counts"]["stripe_events"] == before["counts"]["stripe_events"] + 1
    after["counts"]["stripe_events"] = before["counts"]["stripe_events"]
    assert after == before


async def test_a_payment_failure_whose_error_is_not_an_object_still_fails_the_purchase(
    api: Api, client: AsyncTestClient
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    failed = payment_intent(p["payment_intent"], cents(p), p["id"], last_payment_error="card_declined")
    r = await deliver(client, event("payment_intent.payment_failed", failed))
    assert r.status_code == 200 and r.json()["outcome"] == "payment_failed", r.text
    got = await purchase(client, p["id"])
    assert (got["status"], got["failure_code"]) == ("failed", None)


async def test_checkout_session_async_payment(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "20"))["purchase"]
    session_pi = f"pi_{uuid.uuid4().hex[:14]}"  # the session's own PaymentIntent
    unpaid = checkout_session(session_pi, cents(p), p["id"], payment_status="unpaid")
    r = await deliver(client, event("checkout.session.completed", unpaid))
    assert r.json()["outcome"] == "awaiting_payment"
    assert (await api.balance(acct))["balance"] == "0.00"
    got = await purchase(client, p["id"])
    assert (got["payment_intent"], got["checkout_session"]) == (session_pi, unpaid["id"])
    paid = {**unpaid, "payment_status": "paid"}
    r = await deliver(client, event("checkout.session.async_payment_succeeded", paid))
    assert r.json()["outcome"] == "credited"
    # the PaymentIntent's own event arrives too: already credited
    r = await deliver(client, event("payment_intent.succeeded", payment_intent(session_pi, cents(p))))
    assert r.json()["outcome"] == "already_credited"
    assert (await api.balance(acct))["balance"] == "20.00"


async def test_checkout_session_async_payment_failed(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "20"))["purchase"]
    session = checkout_session(p["payment_intent"], cents(p), p["id"], payment_status="unpaid")
    await deliver(client, event("checkout.session.completed", session))
    r = await deliver(client, event("checkout.session.async_payment_failed", session))
    assert r.json()["outcome"] == "payment_failed"
    assert (await purchase(client, p["id"]))["status"] == "failed"
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_a_second_payment_for_a_paid_purchase_is_kept_for_review(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "20"))["purchase"]
    await deliver(client, event("checkout.session.completed", checkout_session(p["payment_intent"], cents(p), p["id"])))
    other = checkout_session(f"pi_{uuid.uuid4().hex[:14]}", cents(p), p["id"])
    r = await deliver(client, event("checkout.session.completed", other))
    assert r.json()["status"] == "needs_review" and "already paid" in r.json()["outcome"]
    assert (await api.balance(acct))["balance"] == "20.00"


async def test_handling_failure_answers_5xx_keeps_nothing_and_the_retry_credits(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.purchases import service as purchases

    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    payload = event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"]))
    real = purchases.fulfil_payment

    async def broken(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)  # the entry is written ... and then something fails before commit
        raise RuntimeError("database went away")

    monkeypatch.setattr(purchases, "fulfil_payment", broken)
    before = await full_snapshot(engine)
    r = await deliver(client, payload)
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert await full_snapshot(engine) == before
    monkeypatch.setattr(purchases, "fulfil_payment", real)
    r = await deliver(client, payload)  # Stripe's retry
    assert r.status_code == 200 and r.json()["outcome"] == "credited"
    assert (await api.balance(acct))["balance"] == "10.00"


async def test_fulfil_payment_is_the_one_path_for_other_callers(api: Api, client: AsyncTestClient) -> None:
    """The reconciler and support tickets call the same function; it answers what it found."""
    from billing.purchases.service import Payment, Result, fulfil_payment

    acct = (await api.account())["id"]
    p = (await buy(client, acct, "10"))["purchase"]
    ctx = client.app.state.context
    payment = Payment(p["payment_intent"], cents(p), "usd", None, source="support:ticket-1")
    assert (await fulfil_payment(ctx, payment)).result is Result.CREDITED
    assert (await fulfil_payment(ctx, payment)).result is Result.ALREADY_CREDITED
    r = await deliver(client, event("payment_intent.succeeded", payment_intent(p["payment_intent"], cents(p), p["id"])))
    assert r.json()["outcome"] == "already_credited"
    missing = Payment("pi_unknown_" + uuid.uuid4().hex, 100, "usd", None, source="reconciler")
    assert (await fulfil_payment(ctx, missing)).result is Result.NEEDS_REVIEW
    assert (await api.balance(acct))["balance"] == "10.00"


async def test_an_event_with_a_nul_character_still_credits(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    """Text in an event (a cardholder's name, metadata) may hold a NUL, which PostgreSQL cannot store: the
    event is kept without it and handled like any other, so the payment still becomes credits."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "20"))["purchase"]
    pi = payment_intent(
        p["payment_intent"], cents(p), p["id"], description="Ada\x00", billing_details={"name": "A\x00da", "\x00": 1}
    )
    payload = event("payment_intent.succeeded", pi)
    r = await deliver(client, payload)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "credited"
    assert (await api.balance(acct))["balance"] == "20.00"
    async with engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT payload -> 'data' -> 'object' FROM stripe_events WHERE id = :id"),
            {"id": json.loads(payload)["id"]},
        )
    assert stored["description"] == "Ada" and stored["billing_details"] == {"name": "Ada", "": 1}
