"""Accounts over HTTP: creation, balances, history, lots, grants and adjustments."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api, key


async def test_create_account_is_idempotent_on_external_id(client: AsyncTestClient) -> None:
    body = {"external_id": f"ext_{datetime.now(UTC).timestamp()}", "kind": "organization", "name": "Acme"}
    first = await client.post("/v1/accounts", json=body, headers=ADMIN)
    again = await client.post("/v1/accounts", json=body, headers=ADMIN)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and first.json()["object"] == "account"
    assert first.json()["balance"]["balance"] == "0.00"
    other_kind = await client.post("/v1/accounts", json={**body, "kind": "user"}, headers=ADMIN)
    assert other_kind.status_code == 409 and other_kind.json()["error"]["code"] == "external_id_conflict"
    found = await client.get("/v1/accounts", params={"external_id": body["external_id"]}, headers=ADMIN)
    assert found.json()["id"] == first.json()["id"]


async def test_grant_and_adjustments_move_the_balance(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    move = await api.grant(acct, "10.000000000001", category="promotional")
    assert move["balance"]["balance"] == "10.000000000001"
    assert move["lot"]["remaining"] == "10.000000000001" and move["lot"]["category"] == "promotional"
    assert sorted(p["account"] for p in move["entry"]["postings"]) == sorted([acct, "promotional_credits"])
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments",
        json={"amount": "-4.5", "reason": "mis-grant"},
        headers={**ADMIN, **key()},
    )
    assert r.status_code == 201, r.text
    balance = await api.balance(acct)
    assert balance == {
        "object": "balance",
        "account": acct,
        "balance": "5.500000000001",
        "held": "0.00",
        "available": "5.500000000001",
        "total_credits": "5.500000000001",
        "total_usage": "0.00",
    }


async def test_negative_adjustment_beyond_credits_is_402_and_changes_nothing(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    await api.grant(acct, "1.00")
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments",
        json={"amount": "-1.01", "reason": "x"},
        headers={**ADMIN, **key()},
    )
    assert r.status_code == 402
    assert r.json()["error"] == {
        "type": "ledger_error",
        "code": "insufficient_credits",
        "message": "The account has 1.00 USD of live credits; cannot remove 1.01 USD.",
        "available": "1.00",
    }
    assert (await api.balance(acct))["balance"] == "1.00"


async def test_negative_adjustment_consumes_soonest_expiring_lot(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    soon = (datetime.now(UTC) + timedelta(days=5)).isoformat()
    late = await api.grant(acct, "3.00")
    early = await api.grant(acct, "2.00", expires_at=soon)
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments",
        json={"amount": "-2.50", "reason": "x"},
        headers={**ADMIN, **key()},
    )
    assert r.status_code == 201
    lots = (await client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    remaining = {lot["id"]: lot["remaining"] for lot in lots}
    assert remaining == {early["lot"]["id"]: "0.00", late["lot"]["id"]: "2.50"}
    assert [lot["id"] for lot in lots] == [early["lot"]["id"], late["lot"]["id"]]


async def test_lots_page_in_the_order_usage_consumes_them_and_filter_to_the_live_ones(
    api: Api, client: AsyncTestClient
) -> None:
    acct = (await api.account())["id"]
    days = [5, 1, 9, 3]
    made = {
        d: await api.grant(acct, "1.00", expires_at=(datetime.now(UTC) + timedelta(days=d)).isoformat()) for d in days
    }
    order = [made[d]["lot"]["id"] for d in sorted(days)]
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments", json={"amount": "-1.50", "reason": "x"}, headers={**ADMIN, **key()}
    )
    assert r.status_code == 201, r.text

    async def page(**params: Any) -> Any:
        r = await client.get(f"/v1/accounts/{acct}/lots", params=params, headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    first = await page(limit=3)
    assert [lot["id"] for lot in first["data"]] == order[:3] and first["has_more"] is True
    rest = await page(limit=3, starting_after=first["data"][-1]["id"])
    assert [lot["id"] for lot in rest["data"]] == order[3:] and rest["has_more"] is False
    live = await page(live="true")
    assert [(lot["id"], lot["remaining"]) for lot in live["data"]] == [
        (order[1], "0.50"),
        *((i, "1.00") for i in order[2:]),
    ]

    other = await api.grant((await api.account())["id"], "1.00")
    for cursor in (other["lot"]["id"], "lot_x", "je_1"):
        r = await client.get(f"/v1/accounts/{acct}/lots", params={"starting_after": cursor}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "lot_not_found", r.text


async def test_ledger_history_paginates_newest_first_with_running_balance(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    for amount in ["1.00", "2.00", "3.00", "4.00", "5.00"]:
        await api.grant(acct, amount)
    page1 = (await client.get(f"/v1/accounts/{acct}/ledger", params={"limit": 2}, headers=ADMIN)).json()
    assert [(e["amount"], e["balance_after"]) for e in page1["data"]] == [
        ("5.00", "15.00"),
        ("4.00", "10.00"),
    ]
    assert page1["has_more"] is True
    cursor = page1["data"][-1]["id"]
    page2 = (
        await client.get(f"/v1/accounts/{acct}/ledger", params={"limit": 5, "starting_after": cursor}, headers=ADMIN)
    ).json()
    assert [e["balance_after"] for e in page2["data"]] == ["6.00", "3.00", "1.00"]
    assert page2["has_more"] is False


async def test_ledger_history_pages_through_entries_with_several_postings_on_the_account(
    api: Api, client: AsyncTestClient
) -> None:
    """A charge that spends from two lots is one line (its postings on the account summed, the running balance
    after the last); walking the history one line a page, across more postings than a page reads at once,
    gives the same lines as one page of all of them."""
    acct = (await api.account())["id"]
    soon = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    for _ in range(4):
        await api.grant(acct, "1.00", expires_at=soon)
        await api.grant(acct, "1.00")
        r = await client.post(
            "/v1/charges",
            json={"account": acct, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "1.50"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
    whole = (await client.get(f"/v1/accounts/{acct}/ledger", params={"limit": 100}, headers=ADMIN)).json()
    assert whole["has_more"] is False
    assert [(e["amount"], e["balance_after"]) for e in whole["data"][:3]] == [
        ("-1.50", "2.00"),
        ("1.00", "3.50"),
        ("1.00", "2.50"),
    ]
    assert len(whole["data"]) == 12
    walked, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 1} | ({"starting_after": cursor} if cursor else {})
        page = (await client.get(f"/v1/accounts/{acct}/ledger", params=params, headers=ADMIN)).json()
        walked += page["data"]
        if not page["has_more"]:
            break
        cursor = page["data"][-1]["id"]
    assert walked == whole["data"]


async def test_balance_as_of_a_past_time(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    first = await api.grant(acct, "1.00")
    await asyncio.sleep(0.01)  # distinct posting timestamps; the assertion reads them back from the ledger
    await api.grant(acct, "2.00")
    async with engine.connect() as conn:
        t1 = await conn.scalar(
            text("SELECT posted_at FROM journal_entries WHERE id = :i"), {"i": int(first["entry"]["id"][3:])}
        )
    url = f"/v1/accounts/{acct}/balance"
    assert (await client.get(url, params={"as_of": t1.isoformat()}, headers=ADMIN)).json()["balance"] == "1.00"
    before = (t1 - timedelta(seconds=1)).isoformat()
    assert (await client.get(url, params={"as_of": before}, headers=ADMIN)).json()["balance"] == "0.00"
    now = datetime.now(UTC).isoformat()
    assert (await client.get(url, params={"as_of": now}, headers=ADMIN)).json()["balance"] == "3.00"
    for number in ("2026", "1764201600", "1764201600.5", "-1"):  # read as Unix seconds, it would answer 0.00
        r = await client.get(url, params={"as_of": number}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "as_of", (number, r.text)


async def test_balance_as_of_answers_its_time_in_utc(api: Api, client: AsyncTestClient) -> None:
    """Every timestamp the API answers is UTC (SPEC §7), the `as_of` it was asked for too, as "...Z"."""
    acct = (await api.account())["id"]
    await api.grant(acct, "1.00")
    url = f"/v1/accounts/{acct}/balance"
    r = await client.get(url, params={"as_of": "2030-01-01T02:00:00+02:00"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["as_of"] == "2030-01-01T00:00:00Z"
    r = await client.get(url, params={"as_of": "2029-12-31T19:30:00.25-04:30"}, headers=ADMIN)
    assert r.json()["as_of"] == "2030-01-01T00:00:00.250000Z"


async def test_grants_are_audit_logged_with_actor_and_reason(api: Api, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    move = await api.grant(acct, "7.00", reason="ticket 4411")
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT actor, action, reason FROM audit_log WHERE entry_id = :e"),
                {"e": int(move["entry"]["id"][3:])},
            )
        ).one()
    assert row.action == "grant" and row.reason == "ticket 4411" and "bootstrap-admin" in row.actor
    assert move["entry"]["actor"] == row.actor


async def test_journal_entry_is_readable_by_staff(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    move = await api.grant(acct, "2.00", category="compensation")
    r = await client.get(f"/v1/journal_entries/{move['entry']['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json() == move["entry"]
    amounts = {p["account"]: p["amount"] for p in r.json()["postings"]}
    assert amounts == {acct: "2.00", "compensation_credits": "-2.00"}


async def test_every_status_an_idempotent_create_answers_is_documented(client: AsyncTestClient) -> None:
    """Creating an account twice answers 201, then 200 with the same account; the OpenAPI document lists
    both (found by schemathesis' status-code conformance check), here and for organization members."""
    body = {"external_id": "created-twice", "kind": "user"}
    first = await client.post("/v1/accounts", json=body, headers=ADMIN)
    again = await client.post("/v1/accounts", json=body, headers=ADMIN)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    for path in ("/v1/accounts", "/v1/accounts/{account_id}/members"):
        assert {"200", "201"} <= set(paths[path]["post"]["responses"]), path
