"""Support tickets for missing credits (SPEC §5): support names a payment, the service asks Stripe and
resolves the ticket `credited`, `already_credited`, `not_paid`, `wrong_account` or `needs_review`, keeping
what it found, who acted and when."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import stripe
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.auth.principal import Principal
from billing.context import Context
from billing.db.journal import Journal
from billing.settings import Settings
from billing.support import service
from billing.support.schemas import CreateTicket
from tests import plans
from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api, key
from tests.purchases.conftest import buy
from tests.stripe_helpers import checkout_session, full_snapshot, pay_at_emulator

DECLINED = "4000000000000341"  # localstripe declines this card when it is charged


async def open_ticket(client: AsyncTestClient, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> Any:
    return await client.post("/v1/support_tickets", json=body, headers={**headers, **key()})


async def ticket_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM support_tickets")) or 0)


async def test_a_paid_payment_missing_from_the_ledger_is_credited_once_and_the_ticket_keeps_what_it_found(
    api: Api, client: AsyncTestClient, support_stripe: str
) -> None:
    account = (await api.account())["id"]
    purchase = (await buy(client, account, "12.00"))["purchase"]
    # paid at Stripe; the service is not told (no webhook is sent to the in-process app)
    await pay_at_emulator(support_stripe, purchase["payment_intent"])
    assert (await api.balance(account))["balance"] == "0.00"

    support = await api.token(["support"])
    headers = {**support, **key()}
    body = {"account": account, "payment_intent": purchase["payment_intent"], "note": "paid, no credits"}
    r = await client.post("/v1/support_tickets", json=body, headers=headers)
    assert r.status_code == 201, r.text
    ticket = r.json()
    assert ticket["object"] == "support_ticket" and ticket["id"].startswith("tkt_")
    assert (ticket["status"], ticket["account"], ticket["purchase"]) == ("credited", account, purchase["id"])
    assert ticket["entry"] is not None and ticket["note"] == "paid, no credits"
    assert ticket["created_by"].startswith("t (") and ticket["resolved_at"] >= ticket["created_at"]
    [found] = ticket["payments"]
    assert (found["stripe_status"], found["amount"], found["currency"], found["result"]) == (
        "succeeded", purchase["total"], "usd", "credited",
    )  # fmt: skip
    balance = await api.balance(account)
    assert (balance["balance"], balance["total_credits"]) == ("12.00", "12.00")

    # the same request again (same key): the same ticket, nothing more
    again = await client.post("/v1/support_tickets", json=body, headers=headers)
    assert again.status_code == 201 and again.json()["id"] == ticket["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    # a second ticket for the same payment: already credited
    r = await open_ticket(client, {"account": account, "payment_intent": purchase["payment_intent"]})
    assert r.json()["status"] == "already_credited" and r.json()["entry"] == ticket["entry"]
    assert (await api.balance(account))["balance"] == "12.00"
    ledger = (await client.get(f"/v1/accounts/{account}/ledger", headers=ADMIN)).json()["data"]
    assert [line["kind"] for line in ledger] == ["purchase"]

    # read it back
    r = await client.get(f"/v1/support_tickets/{ticket['id']}", headers=support)
    assert r.status_code == 200 and r.json() == ticket


async def test_a_declined_payment_resolves_not_paid_and_fails_the_purchase(
    api: Api, client: AsyncTestClient, support_stripe: str
) -> None:
    account = (await api.account())["id"]
    purchase = (await buy(client, account, "25.00"))["purchase"]
    with pytest.raises(stripe.CardError):
        await pay_at_emulator(support_stripe, purchase["payment_intent"], DECLINED)

    r = await open_ticket(client, {"account": account, "payment_intent": purchase["payment_intent"]})
    assert r.status_code == 201, r.text
    ticket = r.json()
    assert ticket["status"] == "not_paid" and ticket["entry"] is None
    assert "try another card" in ticket["resolution"]
    [found] = ticket["payments"]
    assert (found["stripe_status"], found["failure_code"], found["result"]) == (
        "requires_payment_method", "card_declined", "not_paid",
    )  # fmt: skip
    assert (await api.balance(account))["balance"] == "0.00"
    p = (await client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)).json()
    assert (p["status"], p["failure_code"]) == ("failed", "card_declined")


async def test_a_payment_found_after_its_credits_would_have_expired_is_left_for_review(
    api: Api, client: AsyncTestClient, support_stripe: str, clock_at: Any
) -> None:
    """Credits expire a year after the purchase (SPEC §5): a payment found only after that would be credited
    as a lot already expired — a person settles it instead."""
    account = (await api.account())["id"]
    purchase = (await buy(client, account, "9.00"))["purchase"]
    await pay_at_emulator(support_stripe, purchase["payment_intent"])
    clock_at(datetime.now(UTC) + timedelta(days=366))

    r = await open_ticket(client, {"account": account, "payment_intent": purchase["payment_intent"]})
    assert r.status_code == 201, r.text
    ticket = r.json()
    assert (ticket["status"], ticket["entry"]) == ("needs_review", None)
    assert "its credits would arrive already expired" in ticket["resolution"], ticket["resolution"]
    assert (await api.balance(account))["balance"] == "0.00"
    p = (await client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)).json()
    assert p["status"] == "needs_review" and p["lot"] is None


async def test_a_payment_never_confirmed_is_not_paid(api: Api, client: AsyncTestClient) -> None:
    account = (await api.account())["id"]
    purchase = (await buy(client, account, "5.00"))["purchase"]
    r = await open_ticket(client, {"account": account, "payment_intent": purchase["payment_intent"]})
    assert r.json()["status"] == "not_paid" and "never charged" in r.json()["resolution"]
    p = (await client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)).json()
    assert p["status"] == "pending"  # nothing was declined: the customer may still pay it


async def test_another_accounts_payment_is_wrong_account_and_credits_no_one(
    api: Api, client: AsyncTestClient, support_stripe: str, engine: AsyncEngine
) -> None:
    owner = (await api.account())["id"]
    asker = (await api.account())["id"]
    purchase = (await buy(client, owner, "9.00"))["purchase"]
    await pay_at_emulator(support_stripe, purchase["payment_intent"])
    r = await open_ticket(client, {"account": asker, "payment_intent": purchase["payment_intent"]})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "wrong_account" and owner in r.json()["resolution"]
    assert r.json()["payments"][0]["account"] == owner
    assert (await api.balance(owner))["balance"] == "0.00"
    assert (await api.balance(asker))["balance"] == "0.00"


async def test_a_payment_stripe_does_not_know_needs_review(api: Api, client: AsyncTestClient) -> None:
    account = (await api.account())["id"]
    r = await open_ticket(client, {"account": account, "payment_intent": "pi_doesnotexist000"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "needs_review"
    assert r.json()["resolution"] == "Stripe has no PaymentIntent pi_doesnotexist000"


async def test_a_window_finds_the_accounts_payments_and_credits_what_is_missing(
    api: Api, client: AsyncTestClient, support_stripe: str
) -> None:
    account = (await api.account())["id"]
    start = datetime.now(UTC) - timedelta(minutes=1)
    paid = (await buy(client, account, "6.00"))["purchase"]
    await pay_at_emulator(support_stripe, paid["payment_intent"])
    unpaid = (await buy(client, account, "8.00"))["purchase"]
    end = datetime.now(UTC) + timedelta(minutes=1)
    body = {"account": account, "created_after": start.isoformat(), "created_before": end.isoformat()}
    r = await open_ticket(client, body)
    assert r.status_code == 201, r.text
    ticket = r.json()
    assert ticket["status"] == "credited" and ticket["purchase"] == paid["id"]
    assert ticket["window"] is not None and ticket["payment_intent"] is None
    results = {p["payment_intent"]: p["result"] for p in ticket["payments"]}
    assert results == {paid["payment_intent"]: "credited", unpaid["payment_intent"]: "not_paid"}
    assert (await api.balance(account))["balance"] == "6.00"

    # an empty window: nothing was ever charged
    long_ago = {"account": account, "created_after": "2020-01-01T00:00:00Z", "created_before": "2020-01-02T00:00:00Z"}
    r = await open_ticket(client, long_ago)
    assert r.json()["status"] == "not_paid" and r.json()["payments"] == []


async def test_tickets_are_listed_by_status_and_account_newest_first(api: Api, client: AsyncTestClient) -> None:
    account = (await api.account())["id"]
    made = []
    for _ in range(3):
        r = await open_ticket(client, {"account": account, "payment_intent": "pi_nosuchthing"})
        made.append(r.json()["id"])
    r = await client.get("/v1/support_tickets", params={"status": "needs_review", "account": account}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["data"]] == made[::-1]
    page = await client.get(
        "/v1/support_tickets", params={"account": account, "limit": 2, "starting_after": made[2]}, headers=ADMIN
    )
    assert [t["id"] for t in page.json()["data"]] == [made[1], made[0]] and page.json()["has_more"] is False
    r = await client.get("/v1/support_tickets", params={"status": "credited", "account": account}, headers=ADMIN)
    assert r.json()["data"] == []
    r = await client.get("/v1/support_tickets", params={"status": "solved"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_status"
    r = await client.get("/v1/support_tickets/tkt_999999999", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "support_ticket_not_found"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "one_payment_reference"),
        ({"payment_intent": "pi_a", "checkout_session": "cs_b"}, "one_payment_reference"),
        ({"payment_intent": "ch_123"}, "invalid_payment_intent"),
        ({"checkout_session": "pi_123"}, "invalid_checkout_session"),
        ({"created_after": "2026-01-01T00:00:00Z"}, "incomplete_window"),
        ({"created_after": "2026-01-01T00:00:00", "created_before": "2026-01-02T00:00:00"}, "timestamp_without_zone"),
        ({"created_after": "2026-01-02T00:00:00Z", "created_before": "2026-01-01T00:00:00Z"}, "invalid_window"),
        ({"created_after": "2026-01-01T00:00:00Z", "created_before": "2026-03-01T00:00:00Z"}, "invalid_window"),
        ({"created_after": "9999-12-30T00:00:00Z", "created_before": BEYOND_YEAR_9999_UTC}, "invalid_parameter"),
        ({"created_after": "1999-12-31T00:00:00Z", "created_before": "2000-01-02T00:00:00Z"}, "invalid_parameter"),
        ({"payment_intent": 12}, "invalid_parameter"),
        ({"payment_intent": "pi_a", "amount": "1.00"}, "invalid_parameter"),
    ],
)
async def test_bad_input_is_a_400_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, body: dict[str, Any], code: str
) -> None:
    account = (await api.account())["id"]
    before = (await full_snapshot(engine), await ticket_rows(engine))
    r = await open_ticket(client, {"account": account, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "invalid_request_error"
    assert (await full_snapshot(engine), await ticket_rows(engine)) == before


async def test_who_may_open_tickets(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    account = (await api.account())["id"]
    body = {"account": account, "payment_intent": "pi_nosuchthing"}
    before = await ticket_rows(engine)
    r = await client.post("/v1/support_tickets", json=body, headers=ADMIN)  # no Idempotency-Key
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_required"
    own = await api.token(["account"], account)
    r = await open_ticket(client, body, headers=own)
    assert r.status_code == 403
    gateway = await api.token(["gateway"])
    r = await client.get("/v1/support_tickets", headers=gateway)
    assert r.status_code == 403
    r = await open_ticket(client, {**body, "account": "acct_doesnotexist"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    assert await ticket_rows(engine) == before


class FakeSessions:
    """Stripe's Checkout Sessions, which the emulator does not have: the one session a test describes."""

    def __init__(self, session: dict[str, Any]) -> None:
        self.session = session

    async def retrieve_async(self, session_id: str) -> dict[str, Any]:
        assert session_id == self.session["id"]
        return self.session


def fake_stripe(session: dict[str, Any]) -> Any:
    sessions = FakeSessions(session)
    return SimpleNamespace(v1=SimpleNamespace(checkout=SimpleNamespace(sessions=sessions)))


@pytest.mark.parametrize(
    ("status", "payment_status", "expected", "balance"),
    [
        ("complete", "paid", "credited", "15.00"),
        ("expired", "unpaid", "not_paid", "0.00"),
        ("complete", "unpaid", "needs_review", "0.00"),  # an asynchronous payment still under way
    ],
)
async def test_a_checkout_session_is_looked_up_and_its_payment_resolved(
    api: Api, client: AsyncTestClient, support_settings: Settings, engine: AsyncEngine,
    status: str, payment_status: str, expected: str, balance: str,
) -> None:  # fmt: skip
    account = (await api.account())["id"]
    purchase = (await buy(client, account, "15.00"))["purchase"]
    cents = int(purchase["total"].replace(".", ""))
    session = checkout_session(purchase["payment_intent"], cents, purchase["id"], payment_status)
    session["status"] = status
    ctx = Context(db=engine, journal=Journal(), settings=support_settings)
    staff = Principal(token_id="tok_test", name="support agent", scopes=frozenset({"support"}))

    outcome = await service.open_ticket(
        ctx, staff, CreateTicket(account=account, checkout_session=session["id"]),
        stripe_client=fake_stripe(session), idempotency_key=uuid.uuid4().hex, path="/v1/support_tickets",
    )  # fmt: skip

    assert (outcome.status, outcome.body["status"]) == (201, expected)
    assert outcome.body["checkout_session"] == session["id"]
    assert outcome.body["payments"][0]["stripe_status"] == f"{status}/{payment_status}"
    assert outcome.body["created_by"] == "support agent (tok_test)"
    assert (await api.balance(account))["balance"] == balance
    if expected == "credited":
        p = (await client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)).json()
        assert (p["status"], p["checkout_session"]) == ("succeeded", session["id"])


async def test_a_quiet_accounts_tickets_are_listed_without_walking_everyone_elses(
    api: Api, engine: AsyncEngine
) -> None:
    """Support's list (and the console's account page) filters by account and/or status: planned for its values
    (`CUSTOM_PLANS`), a quiet account's page reads its own tickets, where the generic plan walked every ticket
    back from the newest (counted in rows the plan read, not timed)."""
    from billing.db.engine import CUSTOM_PLANS

    busy, quiet = (await api.account())["id"], (await api.account())["id"]
    async with engine.begin() as conn:
        ids = {
            a: await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :a"), {"a": a}) for a in (busy, quiet)
        }
        ticket = ("INSERT INTO support_tickets (account_id, payment_intent, status, resolution, findings, created_by,"
                  " resolved_at) SELECT :a, 'pi_' || n, :s, 'test', '{}', 'test', now() FROM generate_series(1, :n) AS n")  # fmt: skip
        await conn.execute(text(ticket), {"a": ids[quiet], "s": "needs_review", "n": 1})
        await conn.execute(text(ticket), {"a": ids[busy], "s": "credited", "n": 5000})
        await conn.execute(text("ANALYZE support_tickets"))
    async with engine.begin() as conn:
        await conn.exec_driver_sql(plans.prepare("quiet_tickets", str(service.TICKETS)))
        await conn.exec_driver_sql(CUSTOM_PLANS)
        read = []
        for status, account in [("NULL", ids[quiet]), ("'needs_review'", "NULL")]:
            values = {"status": status, "a": str(account), "cursor": "NULL", "n": "21"}
            explain = plans.explain("quiet_tickets", str(service.TICKETS), values, analyze=True)
            (plan,) = (await conn.exec_driver_sql(explain)).scalar_one()
            read.append(plans.rows_read(plan["Plan"], "support_tickets"))
        await conn.exec_driver_sql("DEALLOCATE quiet_tickets")
    assert max(read) <= 50, read  # of 5,000 and more
