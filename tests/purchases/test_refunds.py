"""Refunds (SPEC §5): unused credits of a card purchase, within 24 hours, to the original payment method,
never the fee, never crypto, never more than what is left of the purchase's lot; and refunds made at Stripe
(its dashboard) reflected in the ledger once, even into debt."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.ledger import entries
from billing.ledger.model import Customer, EntryKind, LotBalance, Platform, Posting
from billing.ledger.outcomes import Refused
from billing.purchases.refunds import RefundAtStripe, at_stripe, named_in, refundable
from billing.settings import Settings
from billing.stripe_client import LOCAL_API_KEY
from billing.verify import verify_ledger
from tests.conftest import ADMIN, Api, key, uvicorn_thread
from tests.purchases.conftest import buy, pay, spend
from tests.stripe_helpers import event, full_snapshot, pay_at_emulator, signed_headers

D = Decimal
PAID = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def rules(**overrides: Any) -> Decimal:
    args: dict[str, Any] = {
        "status": "succeeded",
        "method": "card",
        "paid_at": PAID,
        "now": PAID + timedelta(hours=1),
        "lot_remaining": D("15"),
        "lot_expired": False,
        "requested": None,
        **overrides,
    }
    return refundable(**args)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"status": "pending", "method": "crypto"}, "purchase_not_paid"),  # precedence: not paid first
        ({"method": "crypto", "now": PAID + timedelta(days=2)}, "crypto_not_refundable"),
        ({"now": PAID + timedelta(hours=24, microseconds=1)}, "refund_window_closed"),
        ({"requested": D("0")}, "amount_must_be_positive"),
        ({"requested": D("1.005")}, "amount_not_whole_cents"),
        ({"lot_remaining": D("0.009")}, "nothing_left_to_refund"),
        ({"lot_expired": True}, "nothing_left_to_refund"),
        ({"requested": D("15.01")}, "refund_exceeds_remaining"),
    ],
)
def test_refund_rules_refuse(overrides: dict[str, Any], code: str) -> None:
    with pytest.raises(Refused) as refused:
        rules(**overrides)
    assert refused.value.code == code


def test_refund_rules_allow() -> None:
    assert rules(now=PAID + timedelta(hours=24)) == D("15")  # the 24th hour itself is inside the window
    assert rules(requested=D("15")) == D("15")  # exactly what is left
    assert rules(lot_remaining=D("7.123456789012")) == D("7.12")  # all that is left, in whole cents


def test_clawback_takes_the_purchase_lot_then_other_lots_then_debt_and_reverses_the_fee() -> None:
    c = Customer(5)
    now = PAID
    purchase_lot = LotBalance(1, D("4"), now + timedelta(days=300))
    other = LotBalance(2, D("6"), now + timedelta(days=10))
    entry = entries.clawback(
        c, credits=D("15"), fee=D("0.83"), purchase_lot=purchase_lot, lots=[purchase_lot, other], now=now,
        to=Platform.REFUNDS, kind=EntryKind.REFUND, description="x",
    )  # fmt: skip
    assert entry.postings == (
        Posting(c, D("-4"), 1),
        Posting(c, D("-6"), 2),
        Posting(c, D("-5"), None),  # debt: the account goes negative
        Posting(Platform.PURCHASE_FEE_REVENUE, D("-0.83")),
        Posting(Platform.REFUNDS, D("15.83")),
    )
    assert entry.credits_delta == D("-15") and entry.balance_delta == D("-15")


def made(id_: str, cents: int, second: int, status: str = "succeeded") -> RefundAtStripe:
    return RefundAtStripe(id_, cents, status, PAID + timedelta(seconds=second), None)


def test_bookings_without_a_stripe_id_hold_the_oldest_refunds_no_booking_names() -> None:
    failed, a, b, c = made("re_f", 400, 0, "failed"), made("re_a", 500, 1), made("re_b", 300, 2), made("re_c", 200, 3)
    listed = [c, failed, a, b]  # in any order; a failed refund no longer counts
    # 500 missing of 1000 (500 booked without an id, holding re_a): the newest make it up
    assert named_in(500, listed, set()) == (b, c)
    assert named_in(200, listed, set()) == (c,)
    assert named_in(400, listed, set()) is None  # no run of the newest adds up to it: booked without an id
    assert named_in(200, listed, {"re_c"}) is None
    assert named_in(300, listed, {"re_c"}) == (b,)  # re_c is booked under its id
    assert at_stripe(
        {"id": "re_x", "amount": 500, "created": 1788264000, "status": "pending", "metadata": {"refund_id": "ref_1"}}
    ) == RefundAtStripe("re_x", 500, "pending", datetime(2026, 9, 1, 12, 0, tzinfo=UTC), "ref_1")
    assert at_stripe({"id": "re_x", "amount": "500", "created": 1788264000}) is None


async def paid_purchase(
    api: Api, client: AsyncTestClient, localstripe: str, amount: str = "15.00"
) -> tuple[str, dict[str, Any]]:
    """A purchase really paid at the emulator (so Stripe can refund it), credited by its webhook."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, amount))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    assert (await pay(client, p))["outcome"] == "credited"
    return acct, p


async def refund(client: AsyncTestClient, purchase: str, headers: dict[str, str] | None = None, **body: Any) -> Any:
    """A refund with the `headers` given, by default the admin token's; the admin token gives a reason, as staff
    must (the same one on every retry, so a retry's body is the same)."""
    headers = headers or {**ADMIN, **key()}
    if headers.get("Authorization") == ADMIN["Authorization"]:
        body = {"reason": "customer asked", **body}
    return await client.post(f"/v1/purchases/{purchase}/refunds", json=body, headers=headers)


def refunds_at_stripe(localstripe: str, payment_intent: str) -> list[int]:
    """The amounts (cents) Stripe refunded of a PaymentIntent, smallest first."""
    r = httpx.get(f"{localstripe}/v1/refunds", params={"payment_intent": payment_intent}, auth=(LOCAL_API_KEY, ""))
    return sorted(x["amount"] for x in r.json()["data"])


async def refund_postings(engine: AsyncEngine, entry: str) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT a.public_id, p.amount FROM postings p JOIN accounts a ON a.id = p.account_id"
                " WHERE p.entry_id = :e ORDER BY p.id"
            ),
            {"e": int(entry.removeprefix("je_"))},
        )
        return [(r[0], f"{r[1]:.2f}") for r in rows]


async def test_refund_unused_credits_to_the_card_never_the_fee(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    headers = {**ADMIN, **key()}
    r = await refund(client, p["id"], headers, amount="5.00", reason="changed my mind")
    assert r.status_code == 201, r.text
    made = r.json()["refund"]
    assert (made["amount"], made["fee_amount"], made["total"], made["source"]) == ("5.00", "0.00", "5.00", "api")
    assert await refund_postings(engine, made["entry"]) == [(acct, "-5.00"), ("refunds", "5.00")]
    # Stripe refunded 500 cents of the PaymentIntent: the credits, not the fee
    at_stripe = httpx.get(f"{localstripe}/v1/refunds/{made['stripe_refund']}", auth=(LOCAL_API_KEY, "")).json()
    assert at_stripe["amount"] == 500 and at_stripe["metadata"]["purchase_id"] == p["id"]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("10.00", "10.00")
    again = await refund(client, p["id"], headers, amount="5.00", reason="changed my mind")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true" and again.json() == r.json()
    # the rest: everything that is left (10.00), and then nothing
    rest = await refund(client, p["id"])
    assert rest.status_code == 201 and rest.json()["refund"]["amount"] == "10.00"
    purchase = rest.json()["purchase"]
    assert (purchase["refunded"], purchase["lot"]["remaining"], len(purchase["refunds"])) == ("15.00", "0.00", 2)
    assert purchase["fee"] == "0.83"  # kept
    none_left = await refund(client, p["id"])
    assert none_left.status_code == 409 and none_left.json()["error"]["code"] == "nothing_left_to_refund"
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_refund_never_exceeds_what_is_left_of_the_lot(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe, "20.00")
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments", json={"amount": "-12.345", "reason": "usage"}, headers={**ADMIN, **key()}
    )
    assert r.status_code == 201
    before = await full_snapshot(engine)
    r = await refund(client, p["id"], amount="7.66")
    assert r.status_code == 409, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["remaining"]) == ("refund_exceeds_remaining", "7.65")
    after = await full_snapshot(engine)
    assert (after["money"], after["lots"], after["counts"]["postings"]) == (
        before["money"],
        before["lots"],
        before["counts"]["postings"],
    )
    r = await refund(client, p["id"])  # all that is left, in whole cents: 7.655 -> 7.65
    assert r.status_code == 201 and r.json()["refund"]["amount"] == "7.65"
    assert (await api.balance(acct))["balance"] == "0.005"


async def test_refund_window_is_24_hours(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, clock_at: Any
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    paid_at = datetime.fromisoformat((await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()["paid_at"])
    clock_at(paid_at + timedelta(hours=24, seconds=1))
    r = await refund(client, p["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "refund_window_closed"
    clock_at(paid_at + timedelta(hours=23, minutes=59))
    r = await refund(client, p["id"], amount="1.00")
    assert r.status_code == 201, r.text
    assert (await api.balance(acct))["balance"] == "14.00"


async def test_a_payment_credited_late_keeps_its_time_for_the_refund_window_and_the_lot(
    api: Api, client: AsyncTestClient, localstripe: str
) -> None:
    """Stripe retries an undelivered webhook for days, and the reconciler finds a lost one later still: the
    purchase was made when it was paid, and its refund window (24 hours) and its credits' lifetime (a year)
    run from then, not from whenever the ledger heard of it (SPEC §5)."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])  # (so Stripe could refund it)
    paid_at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=30)
    body = json.loads(event("payment_intent.succeeded", {
        "id": p["payment_intent"], "object": "payment_intent", "amount": 1583, "amount_received": 1583,
        "currency": "usd", "status": "succeeded", "metadata": {"purchase_id": p["id"]},
    }))  # fmt: skip
    body["created"] = int(paid_at.timestamp())  # the event's own time: Stripe keeps it on every retry
    payload = json.dumps(body).encode()
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200 and r.json()["outcome"] == "credited", r.text
    credited = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert datetime.fromisoformat(credited["paid_at"]) == paid_at
    lots = (await client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    assert [datetime.fromisoformat(lot["expires_at"]) for lot in lots] == [paid_at + timedelta(days=365)]
    assert (await api.balance(acct))["balance"] == "15.00"

    r = await refund(client, p["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "refund_window_closed", r.text
    assert (await api.balance(acct))["balance"] == "15.00"


async def test_crypto_and_unpaid_purchases_are_not_refundable(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    crypto = (await buy(client, acct, "10", method="crypto"))["purchase"]
    await pay(client, crypto)
    r = await refund(client, crypto["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "crypto_not_refundable"
    pending = (await buy(client, acct, "10"))["purchase"]
    r = await refund(client, pending["id"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "purchase_not_paid"
    assert (await api.balance(acct))["balance"] == "10.00"


async def test_who_may_refund(api: Api, client: AsyncTestClient, localstripe: str) -> None:
    acct, p = await paid_purchase(api, client, localstripe, "10")
    other = (await api.account())["id"]
    foreign = await api.token(["account"], account=other)
    gateway = await api.token(["gateway"])
    assert (await refund(client, p["id"], {**foreign, **key()})).status_code == 404
    assert (await refund(client, p["id"], {**gateway, **key()})).status_code == 403
    own = await api.token(["account"], account=acct)
    assert (await refund(client, p["id"], {**own, **key()}, amount="1.00")).status_code == 201
    missing = await client.post(f"/v1/purchases/{p['id']}/refunds", json={"reason": "test"}, headers=ADMIN)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "idempotency_key_required"


async def test_input_refused_as_a_4xx_refunds_nothing_at_stripe(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    """A 4xx invites a corrected request: so every input is checked before Stripe is asked, text the
    database cannot store included, and the corrected request is the only refund."""
    acct, p = await paid_purchase(api, client, localstripe)
    before = await full_snapshot(engine)
    r = await refund(client, p["id"], amount="5.00", reason="customer\u0000asked")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unstorable_text", r.text
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == []
    assert await full_snapshot(engine) == before
    r = await refund(client, p["id"], amount="5.00", reason="customer asked")
    assert r.status_code == 201, r.text
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [500]
    assert (await api.balance(acct))["balance"] == "10.00"


async def refund_not_recorded(
    client: AsyncTestClient, monkeypatch: pytest.MonkeyPatch, purchase: str, headers: dict[str, str], **body: Any
) -> None:
    """Stripe refunds, then the ledger fails to record it (the database refuses the refund's text): a 503."""
    from billing.purchases import service as purchases

    real = purchases._refund_rider
    monkeypatch.setattr(purchases, "_refund_rider", lambda **kw: real(**{**kw, "reason": "un\u0000storable"}))
    r = await refund(client, purchase, headers, **body)
    monkeypatch.setattr(purchases, "_refund_rider", real)
    assert r.status_code == 503 and r.json()["error"]["code"] == "refund_not_recorded", r.text


async def deliver(client: AsyncTestClient, payload: bytes) -> dict[str, Any]:
    """A signed Stripe event, delivered to the webhook endpoint."""
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_a_failure_after_stripe_refunded_is_never_a_4xx_and_the_retry_records_the_same_refund(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once Stripe has refunded, a failure to record it (here the database refusing text) is a 503 with
    nothing kept; a retry with the same Idempotency-Key gets the same Stripe refund and records it once."""
    acct, p = await paid_purchase(api, client, localstripe)
    headers = {**ADMIN, **key()}
    before = await full_snapshot(engine)
    await refund_not_recorded(client, monkeypatch, p["id"], headers, amount="5.00")
    assert await full_snapshot(engine) == before
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [500]
    r = await refund(client, p["id"], headers, amount="5.00")
    assert r.status_code == 201, r.text
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [500]
    assert (await api.balance(acct))["balance"] == "10.00"
    # Stripe's event comes after: the refund is booked, whether or not the event names it
    listed = {"refunds": listed_refunds(localstripe, p["payment_intent"])}
    for payload in (charge_refunded(p, 500), charge_refunded(p, 500, **listed)):
        assert (await deliver(client, payload))["outcome"] == "refund_already_booked"
    made = r.json()["refund"]
    assert await refund_rows(engine, p["id"]) == [("api", "500", made["stripe_refund"])]
    assert (await api.balance(acct))["balance"] == "10.00"


def charge_refunded(p: dict[str, Any], cumulative_cents: int, **extra: Any) -> bytes:
    return event(
        "charge.refunded",
        {
            "id": "ch_" + p["payment_intent"][3:],
            "object": "charge",
            "payment_intent": p["payment_intent"],
            "amount": int(D(p["total"]) * 100),
            "amount_refunded": cumulative_cents,
            "refunded": True,
            "currency": "usd",
            "metadata": {},
            **extra,
        },
    )


async def test_refund_arriving_before_the_success_credits_the_payment_then_refunds_once(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    """Stripe's events come in any order: a refunded charge was paid, so it is credited through the one
    fulfilment path first; the success event arriving afterwards changes nothing."""
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    payload = charge_refunded(p, 500, paid=True)
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200 and r.json()["outcome"] == "refund_booked", r.text
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("10.00", "10.00")
    answer = await pay(client, p)
    assert answer["outcome"] == "already_credited"
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert purchase["status"] == "succeeded" and [x["amount"] for x in purchase["refunds"]] == ["5.00"]
    assert (await api.balance(acct))["balance"] == "10.00"


async def test_refund_made_at_stripe_is_clawed_back_once_even_into_debt(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay(client, p)
    await spend(api, client, acct, "10.00")
    # support refunds the whole charge, fee included, in Stripe's dashboard
    payload = charge_refunded(p, 1583)
    for _ in range(3):  # and Stripe repeats itself
        r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
        assert r.status_code == 200
    assert r.json()["outcome"] == "refund_booked" and r.json()["duplicate"] is True
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"], balance["total_usage"]) == ("-10.00", "0.00", "10.00")
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    [made] = purchase["refunds"]
    assert (made["amount"], made["fee_amount"], made["source"]) == ("15.00", "0.83", "stripe")
    assert await refund_postings(engine, made["entry"]) == [
        (acct, "-5.00"),
        (acct, "-10.00"),
        ("purchase_fee_revenue", "-0.83"),
        ("refunds", "15.83"),
    ]
    # an older event (smaller cumulative amount) arriving late changes nothing
    late = charge_refunded(p, 500)
    r = await client.post("/v1/stripe/webhooks", content=late, headers=signed_headers(late))
    assert r.json()["outcome"] == "refund_already_booked"
    assert (await api.balance(acct))["balance"] == "-10.00"


async def test_charge_refunded_for_an_api_refund_changes_nothing(
    api: Api, client: AsyncTestClient, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    assert (await refund(client, p["id"], amount="4.00")).status_code == 201
    payload = charge_refunded(p, 400)
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.json()["outcome"] == "refund_already_booked"
    # a second refund of 2.00 made at Stripe later: only that is booked
    payload = charge_refunded(p, 600)
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.json()["outcome"] == "refund_booked"
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert (purchase["refunded"], [x["amount"] for x in purchase["refunds"]]) == ("6.00", ["4.00", "2.00"])
    assert (await api.balance(acct))["balance"] == "9.00"


async def test_concurrent_refunds_never_exceed_the_lot(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    import asyncio

    acct, p = await paid_purchase(api, client, localstripe)
    answers = await asyncio.gather(*(refund(client, p["id"], amount="4.00") for _ in range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 201, 201, 409, 409, 409], [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {"refund_exceeds_remaining"}
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert (purchase["refunded"], purchase["lot"]["remaining"]) == ("12.00", "3.00")
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [400, 400, 400]  # exactly what was booked
    assert (await api.balance(acct))["balance"] == "3.00"


def listed_refunds(localstripe: str, payment_intent: str) -> dict[str, Any]:
    """The charge's `refunds` list as an event carries it when it lists them (older API versions, or expanded)."""
    r = httpx.get(f"{localstripe}/v1/refunds", params={"payment_intent": payment_intent}, auth=(LOCAL_API_KEY, ""))
    return {"object": "list", "data": r.json()["data"], "has_more": False}


async def refund_rows(engine: AsyncEngine, purchase: str) -> list[tuple[str, str, str | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT r.source, r.amount_cents, r.stripe_refund FROM refunds r JOIN purchases p ON p.id = r.purchase_id"
                " WHERE p.public_id = :p ORDER BY r.id"
            ),
            {"p": purchase},
        )
        return [(r[0], str(r[1]), r[2]) for r in rows]


@pytest.mark.parametrize("body", [{"amount": "5.00"}, {}], ids=["some", "all_that_is_left"])
@pytest.mark.parametrize("lists_refunds", [False, True], ids=["cumulative_only", "event_lists_refunds"])
async def test_a_refund_not_recorded_then_booked_by_stripes_event_is_booked_once_when_retried(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch,
    body: dict[str, str], lists_refunds: bool,
) -> None:  # fmt: skip
    """Stripe refunds, the ledger fails to record it (503), Stripe's `charge.refunded` books it, and then
    the client retries with the same Idempotency-Key: the retry answers the refund the event booked and
    books nothing more — one Stripe refund, its credits taken out once."""
    acct, p = await paid_purchase(api, client, localstripe)
    cents = 500 if body else 1500
    headers = {**ADMIN, **key()}
    await refund_not_recorded(client, monkeypatch, p["id"], headers, **body)
    listed = listed_refunds(localstripe, p["payment_intent"])
    [stripe_refund] = [x["id"] for x in listed["data"]]
    extra = {"refunds": listed} if lists_refunds else {}
    payload = charge_refunded(p, cents, **extra)
    assert (await deliver(client, payload))["outcome"] == "refund_booked"
    left = f"{(1500 - cents) / 100:.2f}"
    assert (await api.balance(acct))["balance"] == left
    [booked] = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()["refunds"]

    r = await refund(client, p["id"], headers, **body)
    assert r.status_code == 201, r.text
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [cents]
    assert await refund_rows(engine, p["id"]) == [("stripe", str(cents), stripe_refund if lists_refunds else None)]
    assert r.json()["refund"] == booked  # the refund as it is: the one the event booked
    purchase = r.json()["purchase"]
    assert (purchase["refunded"], purchase["lot"]["remaining"]) == (f"{cents / 100:.2f}", left)
    assert (await api.balance(acct))["balance"] == left
    again = await refund(client, p["id"], headers, **body)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == r.json()
    assert (await deliver(client, payload))["duplicate"] is True
    later = charge_refunded(p, cents, **extra)  # another event with the same cumulative amount
    assert (await deliver(client, later))["outcome"] == "refund_already_booked"
    assert (await api.balance(acct))["balance"] == left


def at(payload: bytes, created: int) -> bytes:
    """The same event as Stripe would have created it at `created` (unix seconds)."""
    body = json.loads(payload)
    body["created"] = created
    return json.dumps(body).encode()


def refund_at_stripe(localstripe: str, payment_intent: str, cents: int) -> dict[str, Any]:
    """A refund made in Stripe's dashboard."""
    r = httpx.post(
        f"{localstripe}/v1/refunds", data={"payment_intent": payment_intent, "amount": cents}, auth=(LOCAL_API_KEY, "")
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("event_counts_it", [True, False], ids=["event_counts_both", "event_counts_ours_only"])
async def test_a_retry_books_what_no_booking_from_stripes_events_holds(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch,
    event_counts_it: bool,
) -> None:  # fmt: skip
    """A dashboard refund made after ours is its own: the event that booked ours may have booked it too, or
    its own event books it later."""
    acct, p = await paid_purchase(api, client, localstripe)
    headers = {**ADMIN, **key()}
    await refund_not_recorded(client, monkeypatch, p["id"], headers, amount="5.00")
    if event_counts_it:
        refund_at_stripe(localstripe, p["payment_intent"], 300)
    assert (await deliver(client, charge_refunded(p, 800 if event_counts_it else 500)))["outcome"] == "refund_booked"
    if not event_counts_it:
        refund_at_stripe(localstripe, p["payment_intent"], 300)
    [booked] = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()["refunds"]
    r = await refund(client, p["id"], headers, amount="5.00")
    assert r.status_code == 201 and r.json()["refund"] == booked, r.text
    assert (await api.balance(acct))["balance"] == ("7.00" if event_counts_it else "10.00")
    dashboards = await deliver(client, charge_refunded(p, 800))  # the dashboard refund's event
    assert dashboards["outcome"] == ("refund_already_booked" if event_counts_it else "refund_booked")
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [300, 500]
    rows = [("stripe", "800", None)] if event_counts_it else [("stripe", "500", None), ("stripe", "300", None)]
    assert await refund_rows(engine, p["id"]) == rows
    assert (await api.balance(acct))["balance"] == "7.00"


async def test_a_booking_from_an_event_older_than_the_refund_does_not_hold_it(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    refund_at_stripe(localstripe, p["payment_intent"], 300)  # in the dashboard, and booked from its event
    dashboards = at(charge_refunded(p, 300), int(time.time()) - 60)
    assert (await deliver(client, dashboards))["outcome"] == "refund_booked"
    headers = {**ADMIN, **key()}
    await refund_not_recorded(client, monkeypatch, p["id"], headers, amount="5.00")
    r = await refund(client, p["id"], headers, amount="5.00")
    assert r.status_code == 201 and r.json()["refund"]["source"] == "api", r.text
    made = r.json()["refund"]["stripe_refund"]
    assert await refund_rows(engine, p["id"]) == [("stripe", "300", None), ("api", "500", made)]
    assert (await deliver(client, charge_refunded(p, 800)))["outcome"] == "refund_already_booked"
    assert (await api.balance(acct))["balance"] == "7.00"


async def test_a_retry_whose_stripe_refund_failed_before_it_was_booked_is_refused_and_books_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.purchases import service as purchases

    acct, p = await paid_purchase(api, client, localstripe)
    headers = {**ADMIN, **key()}
    await refund_not_recorded(client, monkeypatch, p["id"], headers, amount="5.00")
    listed = purchases.refunds_at_stripe

    async def failed(sdk: Any, payment_intent: str) -> list[RefundAtStripe]:  # the card refund failed since
        return [replace(x, status="failed") for x in await listed(sdk, payment_intent)]

    monkeypatch.setattr(purchases, "refunds_at_stripe", failed)
    before = await full_snapshot(engine)
    r = await refund(client, p["id"], headers, amount="5.00")
    assert r.status_code == 409 and r.json()["error"]["code"] == "refund_failed", r.text
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [500]  # not refunded again
    after = await full_snapshot(engine)  # only the answer, kept with the key, was written
    assert after["counts"].pop("idempotency_keys") == before["counts"].pop("idempotency_keys") + 1
    assert after == before
    assert (await refund(client, p["id"], headers, amount="5.00")).json() == r.json()  # stored with the key
    assert (await api.balance(acct))["balance"] == "15.00"


async def test_an_event_listing_the_charges_refunds_books_each_missing_one_under_its_stripe_id(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    assert (await refund(client, p["id"], amount="4.00")).status_code == 201
    assert (await deliver(client, charge_refunded(p, 400)))["outcome"] == "refund_already_booked"
    refund_at_stripe(localstripe, p["payment_intent"], 300)
    refund_at_stripe(localstripe, p["payment_intent"], 200)
    listed = listed_refunds(localstripe, p["payment_intent"])
    payload = charge_refunded(p, 900, refunds=listed)
    assert [(await deliver(client, payload))["outcome"] for _ in range(2)] == ["refund_booked"] * 2
    by_amount = {x["amount"]: x["id"] for x in listed["data"]}
    rows = await refund_rows(engine, p["id"])
    assert sorted(rows) == sorted(
        [("api", "400", by_amount[400]), ("stripe", "300", by_amount[300]), ("stripe", "200", by_amount[200])]
    )
    assert (await api.balance(acct))["balance"] == "6.00"
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert purchase["refunded"] == "9.00" and purchase["lot"]["remaining"] == "6.00"


@pytest.fixture(scope="module")
def live(settings: Settings) -> Iterator[tuple[str, Any]]:
    """The app served by uvicorn in a thread, as in production. Its base URL, and the Litestar app (for its
    `state`)."""
    from billing.app import create_asgi

    asgi = create_asgi(settings)
    with uvicorn_thread(asgi) as (port, _):
        yield f"http://127.0.0.1:{port}", asgi.app


class StripeRefunding:
    """The served app's Stripe client, held at its `refunds.create` call until the test lets it through: the
    real SDK against the emulator, only slower for as long as the test needs."""

    def __init__(self, app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.asked = threading.Event()
        self.go = threading.Event()
        service = app.state.stripe.v1.refunds
        real = service.create_async

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.asked.set()
            await asyncio.to_thread(self.go.wait, 60)
            return await real(*args, **kwargs)

        monkeypatch.setattr(service, "create_async", held)

    async def wait_asked(self) -> None:
        assert await asyncio.to_thread(self.asked.wait, 20), "Stripe was never asked to refund"


async def refund_while_spending(
    api: Api, live: tuple[str, Any], monkeypatch: pytest.MonkeyPatch, purchase: dict[str, Any], spent: str,
    **body: Any,
) -> httpx.Response:  # fmt: skip
    """Refund through the served app; while its Stripe call is held, a gateway charge of `spent` on the account
    must be answered (201) — within seconds, not after Stripe. The refund's answer."""
    base, app = live
    stripe_side = StripeRefunding(app, monkeypatch)
    gateway = await api.token(["gateway"])
    charge = {"account": purchase["account"], "generation_id": f"gen-{uuid.uuid4().hex}", "cost": spent}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        refunding = asyncio.create_task(
            http.post(
                f"/v1/purchases/{purchase['id']}/refunds", json={"reason": "test", **body}, headers={**ADMIN, **key()}
            )
        )
        try:
            await stripe_side.wait_asked()
            r = await asyncio.wait_for(http.post("/v1/charges", json=charge, headers=gateway), timeout=10)
            assert r.status_code == 201, r.text
            assert not refunding.done()  # the charge was answered while Stripe had not answered
        finally:
            stripe_side.go.set()
            answer = await refunding  # (also when the charge failed: the refund is never left behind)
        return answer


async def test_the_gateway_spends_on_the_account_while_stripe_refunds(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch,
    live: tuple[str, Any],
) -> None:  # fmt: skip
    """Stripe is asked without the account's lock: a gateway charge on the account (and so every charge of
    its batch) does not wait for Stripe's round trips. The refund, once Stripe answers, is booked as asked."""
    acct, p = await paid_purchase(api, client, localstripe)
    r = await refund_while_spending(api, live, monkeypatch, {**p, "account": acct}, "2.00", amount="5.00")
    assert r.status_code == 201, r.text
    assert r.json()["refund"]["amount"] == "5.00"
    assert await refund_postings(engine, r.json()["refund"]["entry"]) == [(acct, "-5.00"), ("refunds", "5.00")]
    assert (await api.balance(acct))["balance"] == "8.00"
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [500]


async def test_credits_spent_while_stripe_refunds_them_are_clawed_back_into_debt(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch,
    live: tuple[str, Any],
) -> None:  # fmt: skip
    """All that was left is refunded; meanwhile the gateway spends 4.00 of it. Stripe has refunded 15.00, so
    the ledger books 15.00: the 11.00 still in the lot, and 4.00 of debt (no other lot) — the account owes
    what it spent, as after a refund made in Stripe's dashboard."""
    acct, p = await paid_purchase(api, client, localstripe)
    r = await refund_while_spending(api, live, monkeypatch, {**p, "account": acct}, "4.00")
    assert r.status_code == 201, r.text
    assert r.json()["refund"]["amount"] == "15.00"
    assert r.json()["purchase"]["lot"]["remaining"] == "0.00"
    assert await refund_postings(engine, r.json()["refund"]["entry"]) == [
        (acct, "-11.00"),
        (acct, "-4.00"),
        ("refunds", "15.00"),
    ]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("-4.00", "0.00")
    assert refunds_at_stripe(localstripe, p["payment_intent"]) == [1500]
    async with engine.connect() as conn:
        assert await verify_ledger(conn) == {}


async def test_stripes_event_for_the_refund_arriving_before_it_is_booked_books_it_once(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str, monkeypatch: pytest.MonkeyPatch,
    live: tuple[str, Any],
) -> None:  # fmt: skip
    """Stripe's `charge.refunded` for the refund can arrive between Stripe's answer and the booking (the account
    is not locked meanwhile): the event books it, and the request answers that booking, booking nothing more."""
    acct, p = await paid_purchase(api, client, localstripe)
    base, app = live
    service = app.state.stripe.v1.refunds
    real = service.create_async

    async def event_first(*args: Any, **kwargs: Any) -> Any:
        made = await real(*args, **kwargs)
        payload = charge_refunded(p, 500, refunds=listed_refunds(localstripe, p["payment_intent"]))
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            r = await http.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
        assert r.status_code == 200 and r.json()["outcome"] == "refund_booked", r.text
        return made

    monkeypatch.setattr(service, "create_async", event_first)
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        r = await http.post(
            f"/v1/purchases/{p['id']}/refunds", json={"reason": "test", "amount": "5.00"}, headers={**ADMIN, **key()}
        )
    assert r.status_code == 201, r.text
    [stripe_refund] = [x["id"] for x in listed_refunds(localstripe, p["payment_intent"])["data"]]
    assert await refund_rows(engine, p["id"]) == [("stripe", "500", stripe_refund)]
    assert r.json()["refund"]["source"] == "stripe"
    assert (await api.balance(acct))["balance"] == "10.00"
