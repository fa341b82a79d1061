"""Failed refunds (issue 4): a refund of ours that Stripe reports `failed` or `canceled` (`refund.failed`,
`refund.updated`, `charge.refund.updated`) puts its credits back once — a reversal of the refund entry into
the purchase's lot, never touching the fee — and marks the refund; repeats, concurrent deliveries and
out-of-order events change nothing more; a failed refund the ledger never booked by id is kept for review."""

from __future__ import annotations

import asyncio
import time
import uuid
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
from billing.stripe_client import LOCAL_API_KEY
from tests.conftest import ADMIN, Api
from tests.purchases.test_refunds import at, charge_refunded, deliver, paid_purchase, refund, refund_at_stripe
from tests.stripe_helpers import event, full_snapshot

D = Decimal
NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def test_refund_failed_puts_credits_back_into_the_lot_and_pays_debt_first() -> None:
    c = Customer(7)
    live = LotBalance(3, D("2"), NOW + timedelta(days=300))
    entry = entries.refund_failed(c, credits=D("5"), lot=live, debt=D("-1.5"), now=NOW, reverses=41, description="x")
    assert entry.postings == (
        Posting(c, D("5"), 3),
        Posting(c, D("-1.5"), 3),  # the debt is paid from the credits coming back
        Posting(c, D("1.5"), None),
        Posting(Platform.REFUNDS, D("-5")),  # nothing on fee revenue: the fee was never refunded
    )
    assert (entry.kind, entry.reverses, entry.new_lot) == (EntryKind.REVERSAL, 41, None)
    assert entry.credits_delta == D("5") and entry.balance_delta == D("5")
    expired = LotBalance(3, D("0"), NOW - timedelta(seconds=1))
    entry = entries.refund_failed(c, credits=D("5"), lot=expired, debt=D("-1.5"), now=NOW, reverses=41, description="")
    assert entry.postings == (Posting(c, D("5"), 3), Posting(Platform.REFUNDS, D("-5")))  # expiry takes it from here
    with pytest.raises(ValueError):
        entries.refund_failed(c, credits=D("0"), lot=live, debt=D("0"), now=NOW, reverses=41, description="")


def refund_object(made: dict[str, Any], p: dict[str, Any], status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": made["stripe_refund"],
        "object": "refund",
        "amount": int(D(made["total"]) * 100),
        "currency": "usd",
        "charge": "ch_" + p["payment_intent"][3:],
        "payment_intent": p["payment_intent"],
        "status": status,
        "failure_reason": "expired_or_canceled_card" if status == "failed" else None,
        "metadata": {"purchase_id": p["id"], "refund_id": made["id"]},
        **extra,
    }


async def refund_row(engine: AsyncEngine, public: str) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT r.status, r.failure_reason, r.failed_at, r.entry_id, r.reversal_entry_id,"
                    " e.kind, e.reverses_entry_id FROM refunds r LEFT JOIN journal_entries e ON e.id = r.reversal_entry_id"
                    " WHERE r.public_id = :p"
                ),
                {"p": public},
            )
        ).one()


async def postings_of(engine: AsyncEngine, entry_id: int) -> list[tuple[str, str, int | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT a.public_id, p.amount, p.lot_id FROM postings p JOIN accounts a ON a.id = p.account_id"
                " WHERE p.entry_id = :e ORDER BY p.id"
            ),
            {"e": entry_id},
        )
        return [(r[0], f"{r[1]:.2f}", r[2]) for r in rows]


async def lot_id(engine: AsyncEngine, purchase: str) -> int:
    async with engine.connect() as conn:
        found = await conn.scalar(text("SELECT lot_id FROM purchases WHERE public_id = :p"), {"p": purchase})
        assert found is not None
        return int(found)


async def snap(engine: AsyncEngine) -> dict[str, Any]:
    s = await full_snapshot(engine)
    async with engine.connect() as conn:
        s["refunds"] = (
            await conn.execute(text("SELECT string_agg(public_id || ':' || status, ',' ORDER BY id) FROM refunds"))
        ).scalar()
    return s


async def test_failed_refund_puts_the_credits_back_once_however_it_is_reported(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    r = await refund(client, p["id"], amount="5.00")
    assert r.status_code == 201, r.text
    made = r.json()["refund"]
    assert (await api.balance(acct))["balance"] == "10.00"
    before = await snap(engine)

    # the failure as Stripe reports it: one event delivered four times at once, and the two other events
    # about the same failure, three times each, all concurrently
    failed = event("refund.failed", refund_object(made, p, "failed"))
    others = [
        event("refund.updated", refund_object(made, p, "failed")),
        event("charge.refund.updated", refund_object(made, p, "failed")),
    ]
    answers = await asyncio.gather(*(deliver(client, x) for x in [failed] * 4 + others * 3))
    fresh = sorted(a["outcome"] for a in answers if not a["duplicate"])
    assert fresh == ["refund already failed"] * 2 + ["refund_failed_credits_back"]  # one per event id
    assert (await deliver(client, failed))["duplicate"] is True  # and once more, later

    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"]) == ("15.00", "15.00")
    row = await refund_row(engine, made["id"])
    assert (row.status, row.failure_reason, row.kind) == ("failed", "expired_or_canceled_card", "reversal")
    assert row.reverses_entry_id == row.entry_id  # the reversal points at the refund entry
    lot = await lot_id(engine, p["id"])
    assert await postings_of(engine, row.reversal_entry_id) == [(acct, "5.00", lot), ("refunds", "-5.00", None)]
    purchase = (await client.get(f"/v1/purchases/{p['id']}", headers=ADMIN)).json()
    assert (purchase["lot"]["remaining"], purchase["refunded"], purchase["fee"]) == ("15.00", "0.00", "0.83")
    [shown] = purchase["refunds"]
    assert (shown["status"], shown["reversal_entry"]) == ("failed", f"je_{row.reversal_entry_id}")

    # nothing else changed: one entry of two postings, the lot and balance back, seven events recorded
    after = await snap(engine)
    assert after["counts"]["journal_entries"] == before["counts"]["journal_entries"] + 1
    assert after["counts"]["postings"] == before["counts"]["postings"] + 2
    assert after["counts"]["stripe_events"] == before["counts"]["stripe_events"] + 3
    assert after["lots"] == before["lots"] + D("5")
    assert after["money"][:3] == (before["money"][0] + 5, before["money"][1] + 5, before["money"][2])
    assert after["refunds"] == before["refunds"].replace(f"{made['id']}:succeeded", f"{made['id']}:failed")
    for k in ("journal_entries", "postings", "stripe_events"):
        after["counts"][k] = before["counts"][k]
    assert (after["counts"], after["purchases"]) == (before["counts"], before["purchases"])


async def test_out_of_order_events_after_a_failure_change_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    made = (await refund(client, p["id"], amount="5.00")).json()["refund"]
    t = int(time.time())
    await deliver(client, at(event("refund.failed", refund_object(made, p, "failed")), t))
    before = await snap(engine)
    late = [
        # Stripe's earlier news about the refund, delivered late
        at(event("refund.updated", refund_object(made, p, "pending")), t - 120),
        at(event("charge.refund.updated", refund_object(made, p, "succeeded")), t - 60),
        # and the charge.refunded sent when the refund was made: its cumulative amount still counts it
        at(charge_refunded(p, 500), t - 60),
        # and a later word that it was canceled: it had already failed
        at(event("refund.updated", refund_object(made, p, "canceled")), t + 60),
    ]
    outcomes = [(await deliver(client, x))["outcome"] for x in late]
    assert outcomes == [
        "refund is pending: nothing to undo",
        "refund is succeeded: nothing to undo",
        "refund_already_booked",
        "refund already failed",
    ]
    after = await snap(engine)
    assert after["counts"]["stripe_events"] == before["counts"]["stripe_events"] + 4
    after["counts"]["stripe_events"] = before["counts"]["stripe_events"]
    assert after == before
    assert (await api.balance(acct))["balance"] == "15.00"

    # after the failure Stripe's cumulative amount no longer holds the failed refund: a dashboard refund of
    # 2.00 made later is booked as 2.00, and the credits that came back can be refunded again
    r = await deliver(client, at(charge_refunded(p, 200), t + 120))
    assert r["outcome"] == "refund_booked"
    assert (await api.balance(acct))["balance"] == "13.00"
    again = await refund(client, p["id"], amount="13.00")
    assert again.status_code == 201, again.text
    assert (await api.balance(acct))["balance"] == "0.00"
    at_stripe = httpx.get(
        f"{localstripe}/v1/refunds", params={"payment_intent": p["payment_intent"]}, auth=(LOCAL_API_KEY, "")
    ).json()["data"]
    assert sorted(x["amount"] for x in at_stripe) == [500, 1300]


async def test_a_failed_refund_of_spent_credits_pays_the_debt_first(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe, "10.00")
    gateway = await api.token(["gateway"])
    hold = await client.post(
        "/v1/holds", json={"request_id": uuid.uuid4().hex, "account": acct, "amount": "3.00"}, headers=gateway
    )
    assert hold.status_code == 201, hold.text
    made = (await refund(client, p["id"])).json()["refund"]  # all of it, while a generation is running
    r = await client.post(
        f"/v1/holds/{hold.json()['id']}/capture", json={"generation_id": uuid.uuid4().hex, "cost": "3.00"},
        headers=gateway,
    )  # fmt: skip
    assert r.status_code == 200, r.text  # a finished generation is paid, into debt
    assert (await api.balance(acct))["balance"] == "-3.00"
    await deliver(client, event("refund.failed", refund_object(made, p, "failed")))
    balance = await api.balance(acct)
    assert (balance["balance"], balance["total_credits"], balance["total_usage"]) == ("7.00", "10.00", "3.00")
    row = await refund_row(engine, made["id"])
    lot = await lot_id(engine, p["id"])
    assert await postings_of(engine, row.reversal_entry_id) == [
        (acct, "10.00", lot),
        (acct, "-3.00", lot),
        (acct, "3.00", None),
        ("refunds", "-10.00", None),
    ]
    lots = (await client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    assert [x["remaining"] for x in lots] == ["7.00"]


async def test_a_failed_refund_never_booked_by_id_is_kept_for_review(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct, p = await paid_purchase(api, client, localstripe)
    # a refund made in Stripe's dashboard, booked only through charge.refunded's cumulative amount
    assert (await deliver(client, charge_refunded(p, 400)))["outcome"] == "refund_booked"
    dashboard = {"id": "re_" + uuid.uuid4().hex[:20], "stripe_refund": None, "total": "4.00"}
    obj = {**refund_object({**dashboard, "stripe_refund": dashboard["id"]}, p, "failed"), "metadata": {}}
    before = await snap(engine)
    r = await deliver(client, event("refund.failed", obj))
    assert r["status"] == "needs_review" and "never booked" in r["outcome"]
    stranger = {**obj, "payment_intent": "pi_" + uuid.uuid4().hex[:14]}
    assert (await deliver(client, event("charge.refund.updated", stranger)))["status"] == "needs_review"
    after = await snap(engine)
    assert after["counts"]["stripe_events"] == before["counts"]["stripe_events"] + 2
    after["counts"]["stripe_events"] = before["counts"]["stripe_events"]
    assert after == before
    assert (await api.balance(acct))["balance"] == "11.00"


async def test_a_failed_refund_booked_from_the_event_under_its_id_is_kept_for_review(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    """A refund `charge.refunded` booked under its Stripe id (the event listed it) was a clawback, which may
    have taken credits from other lots, debt and the fee: its failure is not guessed at either."""
    acct, p = await paid_purchase(api, client, localstripe)
    dashboard = refund_at_stripe(localstripe, p["payment_intent"], 400)
    listed = {"object": "list", "data": [dashboard], "has_more": False}
    assert (await deliver(client, charge_refunded(p, 400, refunds=listed)))["outcome"] == "refund_booked"
    before = await snap(engine)
    obj = {**dashboard, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    r = await deliver(client, event("refund.failed", obj))
    assert r["status"] == "needs_review" and "booked from Stripe's event" in r["outcome"]
    after = await snap(engine)
    after["counts"]["stripe_events"] = before["counts"]["stripe_events"]
    assert after == before
    assert (await api.balance(acct))["balance"] == "11.00"
