"""SPEC §2 (finance): the trial balance — debits and credits per account of the chart as of any time, every
customer's credits account in one line, totals that agree because every entry sums to zero."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from litestar.testing import AsyncTestClient

from tests.conftest import ADMIN, Api

PLATFORM = {
    "stripe_clearing", "crypto_clearing", "manual_payments", "purchase_fee_revenue", "usage_revenue",
    "byok_fee_revenue", "promotional_credits", "compensation_credits", "manual_adjustments", "breakage", "refunds",
    "disputes", "rounding",
}  # fmt: skip


async def trial_balance(client: AsyncTestClient, **params: str) -> dict[str, Any]:
    r = await client.get("/v1/trial_balance", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["balanced"] is True and body["total_debits"] == body["total_credits"], body
    return body


def moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Decimal, Decimal]]:
    """Per line: (debits, credits) added between two trial balances, lines that moved only."""
    old = {line["account"]: line for line in before["lines"]}
    out = {}
    for line in after["lines"]:
        was = old.get(line["account"], {"debits": "0", "credits": "0"})
        delta = (Decimal(line["debits"]) - Decimal(was["debits"]), Decimal(line["credits"]) - Decimal(was["credits"]))
        if delta != (0, 0):
            out[line["account"]] = delta
    return out


async def test_the_trial_balance_moves_with_each_entry_and_answers_as_of_a_past_time(
    api: Api, client: AsyncTestClient
) -> None:
    before = await trial_balance(client)
    assert {line["account"] for line in before["lines"]} >= PLATFORM
    assert all(line["accounts"] == 1 for line in before["lines"] if line["account"] in PLATFORM)
    cut = datetime.now(UTC)  # after `before` was read, before the grant's transaction begins (one clock)

    account = (await api.account())["id"]
    await api.grant(account, "7.00", category="promotional")
    gateway = await api.token(["gateway"])
    r = await client.post(
        "/v1/charges", json={"account": account, "generation_id": f"gen-tb-{cut.timestamp()}", "cost": "0.25"},
        headers=gateway,
    )  # fmt: skip
    assert r.status_code == 201, r.text

    after = await trial_balance(client)
    assert moved(before, after) == {
        "promotional_credits": (Decimal("7.00"), Decimal(0)),
        "usage_revenue": (Decimal(0), Decimal("0.25")),
        "customer_credits": (Decimal("0.25"), Decimal("7.00")),
    }
    customers = next(line for line in after["lines"] if line["account"] == "customer_credits")
    assert customers["type"] == "liability"
    assert Decimal(customers["balance"]) == Decimal(customers["credits"]) - Decimal(customers["debits"])
    clearing = next(line for line in after["lines"] if line["account"] == "stripe_clearing")
    assert clearing["type"] == "asset"
    assert Decimal(clearing["balance"]) == Decimal(clearing["debits"]) - Decimal(clearing["credits"])

    then = await trial_balance(client, as_of=cut.isoformat())
    assert then["as_of"] == cut.isoformat().replace("+00:00", "Z")
    assert moved(before, then) == {}


async def test_the_trial_balance_is_finances_and_refuses_a_bad_time(api: Api, client: AsyncTestClient) -> None:
    account = (await api.account())["id"]
    for scopes, who in ((["gateway"], None), (["account"], account)):
        r = await client.get("/v1/trial_balance", headers=await api.token(scopes, who))
        assert r.status_code == 403, r.text
    assert (await client.get("/v1/trial_balance", headers=await api.token(["support"]))).status_code == 200
    for bad in ("2026", "yesterday", "2026-11-01T00:00:00"):
        r = await client.get("/v1/trial_balance", params={"as_of": bad}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "as_of", (bad, r.text)
