"""One-shot charges: exact cost, zero completion insurance, idempotency on generation_id, bad input."""

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api, snapshot
from tests.gateway.conftest import Gateway, funded

PRICES = {"prompt": "0.0000000375", "completion": "0.00000015", "cache_read": "0.00000001", "request": "0.0001"}


async def test_cost_from_tokens_is_exact(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "10.00")
    usage = {"prompt_tokens": 1234, "completion_tokens": 567, "cache_read_tokens": 1000}
    out = (await gw.charge(account=acct, usage=usage, prices=PRICES, finish_reason="stop")).json()
    # 1234 × 0.0000000375 + 567 × 0.00000015 + 1000 × 0.00000001 + 0.0001
    assert out["total_cost"] == "0.000241325"
    assert out["cache_discount"] == "0.0000275"  # 1000 × (0.0000000375 − 0.00000001)
    assert (out["tokens_prompt"], out["tokens_completion"], out["native_tokens_cached"]) == (1234, 567, 1000)
    assert (await api.balance(acct))["balance"] == "9.999758675"


@pytest.mark.parametrize("finish_reason", [None, "", "error"])
async def test_zero_completion_insurance_waives_token_cost(api: Api, gw: Gateway, finish_reason: Any) -> None:
    acct = await funded(api, "1.00")
    prices = {**PRICES, "web_search": "0.004"}
    usage = {"prompt_tokens": 5000, "completion_tokens": 0, "web_search_results": 2}
    out = (await gw.charge(account=acct, usage=usage, prices=prices, finish_reason=finish_reason)).json()
    assert out["zero_completion_insured"] is True
    assert out["total_cost"] == "0.0081"  # the web search (2 × 0.004) and per-request fee still run


async def test_generation_stores_only_counts_that_are_not_zero(api: Api, gw: Gateway, engine: AsyncEngine) -> None:
    acct = await funded(api, "1.00")
    insured, plain = f"gen-{uuid.uuid4().hex}", f"gen-{uuid.uuid4().hex}"
    usage = {"prompt_tokens": 5000, "completion_tokens": 0, "web_search_results": 2}
    prices = {**PRICES, "web_search": "0.004"}
    charged = [
        (await gw.charge(account=acct, generation_id=insured, usage=usage, prices=prices)).json(),
        (await gw.charge(account=acct, generation_id=plain, cost="0.01")).json(),
    ]
    async with engine.connect() as conn:
        rows = dict(
            (
                await conn.execute(
                    text("SELECT generation_id, usage FROM generations WHERE generation_id IN (:a, :b)"),
                    {"a": insured, "b": plain},
                )
            ).all()
        )
    assert rows == {insured: {"prompt_tokens": 5000, "web_search_results": 2, "insured": True}, plain: {}}
    read = [(await gw.client.get(f"/v1/generations/{g}", headers=gw.headers)).json() for g in (insured, plain)]
    assert read == charged  # what is left out reads back as 0 / not insured
    assert [(r["tokens_prompt"], r["tokens_completion"], r["zero_completion_insured"]) for r in read] == [
        (5000, 0, True),
        (0, 0, False),
    ]


async def test_zero_completion_with_a_real_finish_is_charged(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    out = (await gw.charge(account=acct, usage={"prompt_tokens": 1000}, prices=PRICES, finish_reason="length")).json()
    assert out["zero_completion_insured"] is False and out["total_cost"] == "0.0001375"


async def test_charge_is_idempotent_on_generation_id(api: Api, gw: Gateway, engine: AsyncEngine) -> None:
    acct = await funded(api, "1.00")
    gen = f"gen-{uuid.uuid4().hex}"
    first = (await gw.charge(account=acct, generation_id=gen, cost="0.30")).json()
    again = await gw.charge(account=acct, generation_id=gen, cost="0.30")
    assert again.json() == first and again.headers.get("idempotent-replayed") == "true"
    before = await snapshot(engine)
    other = await gw.charge(expect=409, account=acct, generation_id=gen, cost="0.31")
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert await snapshot(engine) == before
    assert (await api.balance(acct))["balance"] == "0.70"
    read = await gw.client.get(f"/v1/generations/{gen}", headers=gw.headers)
    assert read.status_code == 200 and read.json() == first


async def test_charge_refused_when_credits_cannot_cover(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "0.10")
    r = await gw.charge(expect=402, account=acct, cost="0.20")
    assert r.json()["error"]["limit_source"] == "credits" and r.json()["error"]["available"] == "0.10"
    assert (await api.balance(acct))["balance"] == "0.10"


async def test_zero_cost_charge_records_the_generation_only(api: Api, gw: Gateway) -> None:
    acct = (await api.account())["id"]  # no credits at all: a free generation still records
    out = (await gw.charge(account=acct, cost="0", model="free/model")).json()
    assert out["total_cost"] == "0.00" and out["entry"] is None


BAD: list[tuple[dict[str, Any], int, str]] = [
    ({"cost": "-0.01"}, 400, "amount_must_not_be_negative"),
    ({"cost": "0.0000000000001"}, 400, "too_precise"),
    ({"cost": 0.01}, 400, "invalid_parameter"),
    ({"cost": "10000.01"}, 400, "amount_too_large"),
    ({"cost": "1e-3"}, 400, "invalid_money"),
    ({}, 400, "cost_required"),
    ({"usage": {"prompt_tokens": -1}, "prices": PRICES}, 400, "invalid_parameter"),
    ({"usage": {"prompt_tokens": 10**12}, "prices": PRICES}, 400, "invalid_parameter"),
    ({"usage": {"completion_tokens": 100_000_000}, "prices": {"completion": "1"}}, 400, "amount_too_large"),
    ({"cost": "0.01", "prices": PRICES}, 400, "cost_or_prices"),
    ({"cost": "0.01", "surprise": True}, 400, "invalid_parameter"),
    ({"is_byok": True, "upstream_inference_cost": "0.01"}, 400, "byok_list_cost_required"),
    ({"cost": "0.01", "model": "gpt\x00"}, 400, "unstorable_text"),
    ({"cost": "0.01", "generation_id": "gen_1\n"}, 400, "invalid_parameter"),
    ({"cost": "0.01", "generation_id": "gen 1"}, 400, "invalid_parameter"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD)
async def test_bad_charge_is_refused_and_changes_nothing(
    api: Api, gw: Gateway, engine: AsyncEngine, body: dict[str, Any], status: int, code: str
) -> None:
    acct = await funded(api, "1.00")
    before = await snapshot(engine)
    r = await gw.charge(expect=status, account=acct, **body)
    assert r.json()["error"]["code"] == code
    assert await snapshot(engine) == before


async def test_unknown_payer_is_404(api: Api, gw: Gateway, engine: AsyncEngine) -> None:
    before = await snapshot(engine)
    r = await gw.charge(expect=404, account="acct_nobody", cost="0.01")
    assert r.json()["error"]["code"] == "account_not_found"
    await gw.charge(expect=404, key="key_nobody", cost="0.01")
    await gw.charge(expect=400, cost="0.01")
    assert await snapshot(engine) == before


async def test_account_token_cannot_spend(api: Api, client: Any) -> None:
    acct = await funded(api, "1.00")
    own = await api.token(["account"], account=acct)
    r = await client.post("/v1/charges", json={"account": acct, "generation_id": "g-x", "cost": "0.01"}, headers=own)
    assert r.status_code == 403
    assert (await client.get(f"/v1/accounts/{acct}/balance", headers=ADMIN)).json()["balance"] == "1.00"


async def test_a_nul_character_in_one_charge_costs_the_charges_batched_with_it_nothing(
    api: Api, gw: Gateway, engine: AsyncEngine
) -> None:
    acct = await funded(api, "1.00")
    models = ["a", "b\x00", "c", "d\x00", "e"]
    answers = await asyncio.gather(*(gw.charge(expect=None, account=acct, cost="0.01", model=m) for m in models))
    assert [r.status_code for r in answers] == [201, 400, 201, 400, 201]
    assert {answers[i].json()["error"]["code"] for i in (1, 3)} == {"unstorable_text"}
    assert (await api.balance(acct))["balance"] == "0.97"


def _blocks_read(plan: dict[str, Any], relation: str) -> int:
    """Shared buffers the nodes scanning `relation` (and the index scans under them) touched."""
    own = plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
    children = plan.get("Plans", ())
    if plan.get("Relation Name") == relation:
        return own
    return sum(_blocks_read(child, relation) for child in children)


async def test_a_charge_reads_only_the_lots_with_something_left(api: Api, gw: Gateway, engine: AsyncEngine) -> None:
    """An account that has emptied thousands of lots (a top-up a day for years) pays nothing for them on each
    request: the state read finds the lots it may spend from through an index of the live ones alone (migration
    0020). Counted in buffers, not timed."""
    from datetime import UTC, datetime

    from billing.gateway.service import CHARGE_SQL

    acct = await funded(api, "1.00")
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO lots (account_id, category, amount, remaining, expires_at, entry_id)"
                 " SELECT l.account_id, 'paid', 1, 0, now() + g * interval '1 minute', l.entry_id"
                 " FROM lots l JOIN accounts a ON a.id = l.account_id, generate_series(1, 3000) AS g"
                 " WHERE a.public_id = :a"),
            {"a": acct},
        )  # fmt: skip
        # (paid lots of the grant's entry: what the account purchased grows with them, as a top-up's would)
        await conn.execute(
            text("UPDATE balances SET purchased = purchased + 3000"
                 " WHERE account_id = (SELECT id FROM accounts WHERE public_id = :a)"),
            {"a": acct},
        )  # fmt: skip
        await conn.execute(text("ANALYZE lots"))
    params = {"key": None, "account": acct, "now": datetime.now(UTC), "generation": f"gen-{uuid.uuid4().hex}"}
    async with engine.connect() as conn:
        plan = (await conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CHARGE_SQL}"), params)).scalar_one()
    assert _blocks_read(plan[0]["Plan"], "lots") <= 4

    await gw.charge(account=acct, cost="0.40")
    lots = (await api.client.get(f"/v1/accounts/{acct}/lots", params={"live": "true"}, headers=ADMIN)).json()
    assert [lot["remaining"] for lot in lots["data"]] == ["0.60"]
