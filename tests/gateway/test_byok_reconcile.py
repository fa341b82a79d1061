"""BYOK fee reconciliation (issue 5 item 4): the month's fees recomputed from the recorded requests; a fee
charged wrong on the hot path (a lost counter, simulated by overwriting `byok_months`) is corrected by one
entry that names what it corrects, and a second run posts nothing; a month is closed once."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from billing.context import Context
from billing.jobs.byok import reconcile_byok
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import Gateway
from tests.gateway.test_byok import _account, _byok


async def _id(ctx: Context, account: str) -> int:
    async with ctx.db.connect() as conn:
        return int(await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": account}))


async def _lose_counter(ctx: Context, account_id: int, list_usage: str) -> None:
    """A lost or raced counter: `byok_months` is an ordinary row, not the append-only ledger."""
    async with ctx.db.begin() as conn:
        await conn.execute(
            text("UPDATE byok_months SET list_usage = :u WHERE account_id = :a"),
            {"u": Decimal(list_usage), "a": account_id},
        )


async def _revenue(ctx: Context) -> Decimal:
    async with ctx.db.connect() as conn:
        return Decimal(
            await conn.scalar(
                text("SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN accounts a ON a.id = p.account_id"
                     " WHERE a.public_id = 'byok_fee_revenue'")
            )
        )  # fmt: skip


async def _rows(ctx: Context, sql: str, account_id: int) -> list[Any]:
    async with ctx.db.connect() as conn:
        return list((await conn.execute(text(sql), {"a": account_id})).all())


async def test_an_undercharged_fee_is_corrected_once(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at: Any
) -> None:
    clock_at(datetime(2026, 8, 10, tzinfo=UTC))
    acct = await _account(api, client)
    acct_id = await _id(client_ctx, acct)
    for cost in ["9000.00", "9000.00", "6000.00"]:
        assert (await _byok(gw, acct, cost))["byok_fee"] == "0.00"
    await _lose_counter(client_ctx, acct_id, "0")  # the counter forgets the 24,000 used
    assert (await _byok(gw, acct, "1010.00"))["byok_fee"] == "0.00"  # should be 5% of 10 = 0.50
    assert (await _byok(gw, acct, "2.00"))["byok_fee"] == "0.00"  # should be 0.10
    before, revenue = await api.balance(acct), await _revenue(client_ctx)
    assert before["balance"] == "100.00"

    now = datetime(2026, 8, 20, tzinfo=UTC)
    run = await reconcile_byok(client_ctx, date(2026, 8, 1), now=now, account_ids=[acct_id])

    assert [(c.account, c.amount, c.expected, c.charged) for c in run.corrections] == [
        (acct, Decimal("0.6"), Decimal("0.6"), Decimal(0))
    ]
    after = await api.balance(acct)
    assert after["balance"] == "99.40" and after["total_usage"] == "0.60"
    assert await _revenue(client_ctx) - revenue == Decimal("0.6")
    entry = (await client.get(f"/v1/journal_entries/{run.corrections[0].entry}", headers=ADMIN)).json()
    assert entry["kind"] == "byok_fee" and "2026-08" in entry["description"]
    assert {p["account"]: p["amount"] for p in entry["postings"]} == {acct: "-0.60", "byok_fee_revenue": "0.60"}
    corrections = await _rows(
        client_ctx, "SELECT month, amount, entry_id FROM byok_corrections WHERE account_id = :a", acct_id
    )
    assert [(m, a) for m, a, _ in corrections] == [(date(2026, 8, 1), Decimal("0.6"))]
    assert f"je_{corrections[0][2]}" == run.corrections[0].entry
    month = await _rows(client_ctx, "SELECT list_usage, requests, fees FROM byok_months WHERE account_id = :a", acct_id)
    assert month == [(Decimal("25012"), 5, Decimal("0.6"))]

    again = await reconcile_byok(client_ctx, date(2026, 8, 1), now=now, account_ids=[acct_id])
    assert again.accounts == 1 and again.corrections == []
    assert (await api.balance(acct))["balance"] == "99.40"
    assert await _revenue(client_ctx) - revenue == Decimal("0.6")


async def test_an_overcharged_fee_comes_back_as_a_lot(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at: Any
) -> None:
    clock_at(datetime(2026, 8, 12, tzinfo=UTC))
    acct = await _account(api, client)
    acct_id = await _id(client_ctx, acct)
    assert (await _byok(gw, acct, "1000.00"))["byok_fee"] == "0.00"
    await _lose_counter(client_ctx, acct_id, "30000")  # a counter too high: the hot path over-charges
    assert (await _byok(gw, acct, "10.00"))["byok_fee"] == "0.50"
    assert (await api.balance(acct))["balance"] == "99.50"
    revenue = await _revenue(client_ctx)

    now = datetime(2026, 8, 20, tzinfo=UTC)
    run = await reconcile_byok(client_ctx, date(2026, 8, 1), now=now, account_ids=[acct_id])

    assert [(c.amount, c.expected, c.charged) for c in run.corrections] == [
        (Decimal("-0.5"), Decimal(0), Decimal("0.5"))
    ]
    after = await api.balance(acct)
    assert after["balance"] == "100.00" and after["total_usage"] == "0.00"
    assert await _revenue(client_ctx) - revenue == Decimal("-0.5")
    lots = await _rows(
        client_ctx, "SELECT category, amount FROM lots WHERE account_id = :a AND category = 'compensation'", acct_id
    )
    assert lots == [("compensation", Decimal("0.5"))]
    assert (await reconcile_byok(client_ctx, date(2026, 8, 1), now=now, account_ids=[acct_id])).corrections == []


async def test_a_policy_change_mid_month_is_honoured_per_generation(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at: Any
) -> None:
    clock_at(datetime(2033, 4, 20, tzinfo=UTC))
    for effective, rate in [("2033-05-01T00:00:00Z", "0.05"), ("2033-05-15T00:00:00Z", "0.10")]:
        r = await client.post(
            "/v1/byok_fee_policies",
            json={"reason": "finance: new policy", "kind": "allowance_usd", "allowance_usd": "100.00", "enterprise_allowance_usd": "1000.00",
                  "rate": rate, "effective_from": effective},
            headers=ADMIN,
        )  # fmt: skip
        assert r.status_code == 201, r.text
    clock_at(datetime(2033, 5, 10, tzinfo=UTC))
    acct = await _account(api, client)
    acct_id = await _id(client_ctx, acct)
    assert (await _byok(gw, acct, "150.00"))["byok_fee"] == "2.50"  # 50 above the allowance at 5%
    clock_at(datetime(2033, 5, 20, tzinfo=UTC))
    await _lose_counter(client_ctx, acct_id, "0")
    assert (await _byok(gw, acct, "50.00"))["byok_fee"] == "0.00"  # should be 50 at the new 10% = 5.00

    now = datetime(2033, 5, 21, tzinfo=UTC)
    run = await reconcile_byok(client_ctx, date(2033, 5, 1), now=now, account_ids=[acct_id])

    assert [(c.amount, c.expected, c.charged) for c in run.corrections] == [
        (Decimal("5"), Decimal("7.5"), Decimal("2.5"))
    ]
    assert (await api.balance(acct))["balance"] == "92.50"
    assert (await reconcile_byok(client_ctx, date(2033, 5, 1), now=now, account_ids=[acct_id])).corrections == []


async def test_a_backdated_policy_does_not_reprice_generations_already_charged(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at: Any
) -> None:
    """SPEC §5: rules are versioned so past entries keep the rule that made them; a generation is recomputed
    with the policy it recorded, not one added later with an earlier `effective_from`."""
    clock_at(datetime(2047, 1, 10, tzinfo=UTC))
    acct = await _account(api, client)
    acct_id = await _id(client_ctx, acct)
    assert (await _byok(gw, acct, "100.00"))["byok_fee"] == "0.00"  # the default policy, $25,000 free
    # then a stricter version effective from the 1st (backdated), and the default again from February
    for effective, allowance, rate in [
        ("2047-01-01T00:00:00Z", "0.00", "0.10"),
        ("2047-02-01T00:00:00Z", "25000.00", "0.05"),
    ]:
        r = await client.post(
            "/v1/byok_fee_policies",
            json={"reason": "finance: new policy", "kind": "allowance_usd", "allowance_usd": allowance, "enterprise_allowance_usd": "200000.00",
                  "rate": rate, "effective_from": effective},
            headers=ADMIN,
        )  # fmt: skip
        assert r.status_code == 201, r.text

    run = await reconcile_byok(
        client_ctx, date(2047, 1, 1), now=datetime(2047, 1, 10, 1, tzinfo=UTC), account_ids=[acct_id]
    )

    assert run.corrections == []
    assert (await api.balance(acct))["balance"] == "100.00"


async def test_a_month_is_closed_once_and_then_skipped(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at: Any
) -> None:
    clock_at(datetime(2026, 7, 10, tzinfo=UTC))
    acct = await _account(api, client)
    acct_id = await _id(client_ctx, acct)
    for cost in ["9000.00", "9000.00", "7000.00"]:
        await _byok(gw, acct, cost)
    await _lose_counter(client_ctx, acct_id, "0")
    assert (await _byok(gw, acct, "20.00"))["byok_fee"] == "0.00"  # should be 1.00
    july = date(2026, 7, 1)

    with pytest.raises(ValueError, match="not ended"):
        await reconcile_byok(
            client_ctx, july, close=True, now=datetime(2026, 7, 31, 23, tzinfo=UTC), account_ids=[acct_id]
        )

    now = datetime(2026, 8, 1, 2, tzinfo=UTC)
    first = await reconcile_byok(client_ctx, july, close=True, now=now, account_ids=[acct_id])
    assert first.closed == 1 and [c.amount for c in first.corrections] == [Decimal(1)]
    second = await reconcile_byok(client_ctx, july, close=True, now=now, account_ids=[acct_id])
    assert second.closed == 0 and second.accounts == 0 and second.corrections == []
    closings = await _rows(client_ctx, "SELECT month, entry_id FROM byok_month_closings WHERE account_id = :a", acct_id)
    assert [(m, f"je_{e}") for m, e in closings] == [(july, first.corrections[0].entry)]

    await _lose_counter(client_ctx, acct_id, "0")  # even a wrong counter is left alone once the month is closed
    later = await reconcile_byok(client_ctx, july, now=now, account_ids=[acct_id])
    assert later.accounts == 0 and later.corrections == []
    assert (await api.balance(acct))["balance"] == "99.00"
