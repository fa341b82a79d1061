"""BYOK fees: a monthly allowance of list-price usage ($25,000; $200,000 enterprise), then 5% of the
list-price cost from credits, only on the part above the allowance; the older per-request policy too."""

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import text

from billing.context import Context
from billing.jobs.byok import reconcile_byok
from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api
from tests.gateway.conftest import Gateway


async def _account(api: Api, client: AsyncTestClient, enterprise: bool = False) -> str:
    r = await client.post(
        "/v1/accounts", json={"external_id": f"byok_{uuid.uuid4().hex}", "enterprise": enterprise}, headers=ADMIN
    )
    account = r.json()["id"]
    await api.grant(account, "100.00")
    return account


async def _byok(gw: Gateway, account: str, list_cost: str) -> dict:  # type: ignore[type-arg]
    r = await gw.charge(account=account, is_byok=True, byok_list_cost=list_cost, upstream_inference_cost=list_cost)
    return r.json()


async def test_request_straddling_the_allowance_pays_only_on_the_excess(
    api: Api, gw: Gateway, client: AsyncTestClient, clock_at
) -> None:  # type: ignore[no-untyped-def]
    clock_at(datetime(2026, 11, 15, tzinfo=UTC))
    acct = await _account(api, client)
    for cost in ["9000.00", "9000.00", "6990.00"]:  # 24,990 of the 25,000 allowance used
        assert (await _byok(gw, acct, cost))["byok_fee"] == "0.00"
    straddling = await _byok(gw, acct, "20.00")  # 10 inside the allowance, 10 above it
    assert straddling["byok_fee"] == "0.50" and straddling["total_cost"] == "0.50"
    assert straddling["is_byok"] is True and straddling["upstream_inference_cost"] == "20.00"
    above = await _byok(gw, acct, "0.000000000001")
    assert above["byok_fee"] == "0.00"  # 5% of 1e-12 rounds half-up to 0 at 1e-12 resolution
    assert (await _byok(gw, acct, "1.00"))["byok_fee"] == "0.05"
    balance = await api.balance(acct)
    assert balance["balance"] == "99.45" and balance["total_usage"] == "0.55"
    entry = (await client.get(f"/v1/journal_entries/{straddling['entry']}", headers=ADMIN)).json()
    assert entry["kind"] == "byok_fee" and {p["account"]: p["amount"] for p in entry["postings"]} == {
        acct: "-0.50",
        "byok_fee_revenue": "0.50",
    }


async def test_allowance_resets_with_the_utc_month(api: Api, gw: Gateway, client: AsyncTestClient, clock_at) -> None:  # type: ignore[no-untyped-def]
    clock_at(datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    acct = await _account(api, client)
    for cost in ["9000.00", "9000.00", "7000.00"]:
        await _byok(gw, acct, cost)
    assert (await _byok(gw, acct, "10.00"))["byok_fee"] == "0.50"
    clock_at(datetime(2026, 11, 1, 0, 0, tzinfo=UTC))
    assert (await _byok(gw, acct, "10.00"))["byok_fee"] == "0.00"


async def test_enterprise_allowance_is_200k(api: Api, gw: Gateway, client: AsyncTestClient, clock_at) -> None:  # type: ignore[no-untyped-def]
    clock_at(datetime(2026, 9, 10, tzinfo=UTC))
    acct = await _account(api, client, enterprise=True)
    for _ in range(3):
        assert (await _byok(gw, acct, "9000.00"))["byok_fee"] == "0.00"  # 27,000 > 25,000: still free


async def test_enterprise_allowance_falls_back_to_the_standard_one(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at
) -> None:  # type: ignore[no-untyped-def]
    """A policy version that gives only `allowance_usd` gives it to enterprise accounts too, not nothing: an
    enterprise account never gets less than a standard one. The fee reconciliation applies the same rule."""
    r = await client.post(
        "/v1/byok_fee_policies",
        json={
            "reason": "finance: new policy",
            "kind": "allowance_usd",
            "allowance_usd": "30000",
            "rate": "0.05",
            "effective_from": "2040-01-01T00:00:00Z",
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    clock_at(datetime(2040, 2, 1, tzinfo=UTC))
    accounts = [await _account(api, client), await _account(api, client, enterprise=True)]
    for acct in accounts:
        fees = [(await _byok(gw, acct, cost))["byok_fee"] for cost in ("9000.00", "9000.00", "9000.00", "3000.00")]
        assert fees == ["0.00"] * 4, acct  # the $30,000 allowance
        assert (await _byok(gw, acct, "10.00"))["byok_fee"] == "0.50"  # and no more
    async with client_ctx.db.connect() as conn:
        ids = list(
            (await conn.execute(text("SELECT id FROM accounts WHERE public_id = ANY(:a)"), {"a": accounts})).scalars()
        )
    run = await reconcile_byok(client_ctx, date(2040, 2, 1), now=datetime(2040, 2, 2, tzinfo=UTC), account_ids=ids)
    assert (run.accounts, run.corrections) == (2, [])


async def test_a_policy_effective_after_the_year_9000_utc_is_refused(client: AsyncTestClient) -> None:
    before = (await client.get("/v1/byok_fee_policies", headers=ADMIN)).json()
    r = await client.post(
        "/v1/byok_fee_policies",
        json={
            "reason": "finance: new policy",
            "kind": "free_requests",
            "free_requests": 2,
            "rate": "0.05",
            "effective_from": BEYOND_YEAR_9999_UTC,
        },
        headers=ADMIN,
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "effective_from")
    assert (await client.get("/v1/byok_fee_policies", headers=ADMIN)).json() == before


async def test_older_free_requests_policy_is_expressible(
    api: Api, gw: Gateway, client: AsyncTestClient, clock_at
) -> None:  # type: ignore[no-untyped-def]
    r = await client.post(
        "/v1/byok_fee_policies",
        json={
            "reason": "finance: new policy",
            "kind": "free_requests",
            "free_requests": 2,
            "rate": "0.05",
            "effective_from": "2031-01-01T00:00:00Z",
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    policy = r.json()["id"]
    clock_at(datetime(2031, 2, 1, tzinfo=UTC))
    acct = await _account(api, client)
    fees = [(await _byok(gw, acct, "2.00"))["byok_fee"] for _ in range(3)]
    assert fees == ["0.00", "0.00", "0.10"]
    listed = {p["id"]: p for p in (await client.get("/v1/byok_fee_policies", headers=ADMIN)).json()["data"]}
    assert listed[policy]["free_requests"] == 2 and listed[policy]["kind"] == "free_requests"


async def test_zero_completion_insurance_covers_a_byok_generation(
    api: Api, gw_path: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at
) -> None:  # type: ignore[no-untyped-def]
    """SPEC §5: a generation with zero output tokens and a blank or error finish reason is not charged for its
    tokens. A BYOK one pays no fee on them, and its list cost neither uses up the month's allowance nor counts
    as the key's BYOK usage; what the gateway reported stays on the record, and the month's reconciliation
    agrees. Charges and captures, batched and single."""
    gw = gw_path
    clock_at(datetime(2026, 11, 16, tzinfo=UTC))
    acct = await _account(api, client)
    key = (await client.post(f"/v1/accounts/{acct}/keys", json={"reason": "test", "name": "k"}, headers=ADMIN)).json()[
        "id"
    ]
    for cost in ["9000.00", "9000.00", "6990.00"]:  # 24,990 of the 25,000 allowance used
        await _byok(gw, acct, cost)
    failed = {
        "is_byok": True,
        "byok_list_cost": "40.00",
        "upstream_inference_cost": "0.30",
        "usage": {"prompt_tokens": 3000, "completion_tokens": 0},
    }
    charged = (await gw.charge(key=key, finish_reason="error", **failed)).json()
    hold = (await gw.hold(key=key, amount="1.00")).json()["id"]
    captured = (await gw.capture(hold, **failed)).json()["generation"]  # no finish reason at all
    for out in (charged, captured):
        assert (out["byok_fee"], out["total_cost"], out["zero_completion_insured"]) == ("0.00", "0.00", True)
        assert (out["byok_list_cost"], out["upstream_inference_cost"], out["tokens_prompt"]) == ("40.00", "0.30", 3000)
    # Output, however little: the insurance is off and the fee is charged, here on the 10 above the allowance.
    answered = await gw.charge(key=key, finish_reason="error", **{**failed, "usage": {"completion_tokens": 1}})
    assert (answered.json()["byok_fee"], answered.json()["zero_completion_insured"]) == ("1.50", False)
    view = (await client.get(f"/v1/keys/{key}", headers=ADMIN)).json()
    assert (view["byok_usage"], view["usage"]) == ("40.00", "1.50")
    assert (await api.balance(acct))["balance"] == "98.50"

    month = await _reconciled_month(client_ctx, acct, date(2026, 11, 1), now=datetime(2026, 11, 20, tzinfo=UTC))
    assert month == [(Decimal("25030"), 4, Decimal("1.5"))]  # the two insured ones are no requests either


async def test_an_insured_byok_request_is_not_one_of_the_months_free_requests(
    api: Api, gw_path: Gateway, client: AsyncTestClient, client_ctx: Context, clock_at
) -> None:  # type: ignore[no-untyped-def]
    """Under the older per-request policy, a BYOK generation that zero completion insurance covers pays nothing
    and uses none of the month's free requests, as it uses none of the list-price allowance: counted, it would
    make a later request that produced output pay the 5% fee. Charges and captures, batched and single; the
    month's reconciliation agrees."""
    gw = gw_path
    policy = {"reason": "finance: per-request policy", "kind": "free_requests", "free_requests": 2, "rate": "0.05"}
    r = await client.post(
        "/v1/byok_fee_policies", json={**policy, "effective_from": "2052-01-01T00:00:00Z"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    clock_at(datetime(2052, 3, 10, tzinfo=UTC))
    acct = await _account(api, client)
    failed = {
        "is_byok": True,
        "byok_list_cost": "2.00",
        "upstream_inference_cost": "2.00",
        "usage": {"prompt_tokens": 3000, "completion_tokens": 0},
    }
    insured = [(await gw.charge(account=acct, finish_reason="error", **failed)).json()]
    hold = (await gw.hold(account=acct, amount="1.00")).json()["id"]
    insured.append((await gw.capture(hold, **failed)).json()["generation"])
    assert [(g["byok_fee"], g["zero_completion_insured"]) for g in insured] == [("0.00", True)] * 2
    paid = [(await _byok(gw, acct, "2.00"))["byok_fee"] for _ in range(3)]
    assert paid == ["0.00", "0.00", "0.10"]  # two free requests, then 5% of the list cost

    month = await _reconciled_month(client_ctx, acct, date(2052, 3, 1), now=datetime(2052, 3, 11, tzinfo=UTC))
    assert month == [(Decimal("6.00"), 3, Decimal("0.10"))]


async def _reconciled_month(ctx: Context, account: str, month: date, *, now: datetime) -> list[Any]:
    """The month's BYOK reconciliation for `account`, which must find nothing to correct; then the account's
    `byok_months` rows (list usage, requests, fees) as it left them."""
    acct_id = await _account_id(ctx, account)
    run = await reconcile_byok(ctx, month, now=now, account_ids=[acct_id])
    assert run.accounts == 1 and run.corrections == []
    async with ctx.db.connect() as conn:
        return list(
            await conn.execute(
                text("SELECT list_usage, requests, fees FROM byok_months WHERE account_id = :a"), {"a": acct_id}
            )
        )


async def _account_id(ctx: Context, account: str) -> int:
    async with ctx.db.connect() as conn:
        return int(await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": account}))
