"""Group commit: one batch of concurrent charges, written by one set-based statement in one transaction,
leaves exactly what the same charges one by one would have left."""

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.auth.principal import Principal
from billing.errors import ApiError
from billing.gateway import schemas as s
from billing.gateway.batch import ChargeBatcher
from billing.verify import verify_ledger
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import funded

GATEWAY = Principal("tok_batch", "batch test", frozenset({"gateway"}))


def _answer(outcome: tuple[int, Any, bool] | BaseException) -> tuple[int, Any, bool]:
    """(status, body, replayed), an ApiError included; anything else raised is a failure."""
    if isinstance(outcome, ApiError):
        return outcome.status, outcome.body(), False
    assert not isinstance(outcome, BaseException), outcome
    return outcome


def _charge(**body: Any) -> s.CreateCharge:
    body.setdefault("generation_id", f"gen-{uuid.uuid4().hex}")
    return msgspec.convert(body, s.CreateCharge)


async def test_one_batch_of_mixed_charges_writes_what_single_charges_would(
    api: Api, client: AsyncTestClient, client_ctx: Any, engine: AsyncEngine, clock_at: Any
) -> None:
    clock_at(datetime(2026, 11, 20, 12, tzinfo=UTC))
    two_lots = await funded(api, "0.50")
    await api.grant(two_lots, "0.50")  # two lots of 0.50: the charges below cross from one into the other
    keyed = await funded(api, "10.00")
    key = (await client.post(f"/v1/accounts/{keyed}/keys", json={"name": "k", "limit": "0.50"}, headers=ADMIN)).json()
    byok = await funded(api, "100.00")
    repeated = _charge(account=two_lots, cost="0.30")
    charges = [
        repeated,
        _charge(account=two_lots, cost="0.40"),
        _charge(account=two_lots, cost="0.50"),  # 0.30 left: refused, credits
        repeated,  # the same generation again, inside the same batch: charged once
        _charge(account=two_lots, cost="0.30"),  # exactly what is left
        _charge(key=key["id"], cost="0.20"),
        _charge(key=key["id"], cost="0.20"),
        _charge(key=key["id"], cost="0.20"),  # 0.10 left under the key's limit: refused, key_limit
        *(_charge(account=byok, is_byok=True, byok_list_cost=cost) for cost in ("9000.00", "9000.00", "6990.00")),
        _charge(account=byok, is_byok=True, byok_list_cost="20.00"),  # straddles the $25,000 allowance
        _charge(account="acct_does_not_exist", cost="0.01"),
    ]
    assert (await ChargeBatcher(client_ctx).charge(GATEWAY, charges[0]))[0] == 201  # a batch of one, alone
    batcher = ChargeBatcher(client_ctx)  # the rest arrive together: one batch
    outcomes = [
        _answer(o)
        for o in await asyncio.gather(*(batcher.charge(GATEWAY, c) for c in charges[1:]), return_exceptions=True)
    ]

    statuses = [o[0] for o in outcomes]
    assert statuses == [201, 402, 201, 201, 201, 201, 402, 201, 201, 201, 201, 404]
    assert outcomes[1][1]["error"]["limit_source"] == "credits"
    assert outcomes[6][1]["error"]["limit_source"] == "key_limit"
    assert outcomes[2][2] is True  # the repeated generation was answered from its record
    assert outcomes[10][1].byok_fee == "0.50"  # 5% of the 10 above the allowance

    assert (await api.balance(two_lots))["balance"] == "0.00"
    assert (await api.balance(keyed))["balance"] == "9.60"
    assert (await api.balance(byok))["balance"] == "99.50"
    view = (await client.get(f"/v1/keys/{key['id']}", headers=ADMIN)).json()
    assert (view["usage"], view["usage_daily"], view["limit_remaining"]) == ("0.40", "0.40", "0.10")

    written = [o[1].entry for o in outcomes if o[0] == 201 and not o[2] and o[1].entry]
    async with engine.connect() as conn:
        ids = [int(e.removeprefix("je_")) for e in written]
        # every entry of the batch was written by one transaction
        assert await conn.scalar(
            text("SELECT count(DISTINCT xmin::text) FROM journal_entries WHERE id = ANY(:ids)"), {"ids": ids}
        ) == 1  # fmt: skip
        postings = (
            await conn.execute(
                text(
                    "SELECT p.amount, p.balance_after, p.lot_id FROM postings p JOIN accounts a ON a.id = p.account_id"
                    " WHERE a.public_id = :a AND p.entry_id = ANY(:ids) ORDER BY p.id"
                ),
                {"a": two_lots, "ids": ids},
            )
        ).all()
        lots = (
            await conn.execute(
                text(
                    "SELECT l.remaining FROM lots l JOIN accounts a ON a.id = l.account_id WHERE a.public_id = :a"
                    " ORDER BY l.id"
                ),
                {"a": two_lots},
            )
        ).scalars().all()  # fmt: skip
        month = (
            await conn.execute(
                text(
                    "SELECT m.list_usage, m.requests, m.fees FROM byok_months m JOIN accounts a ON a.id = m.account_id"
                    " WHERE a.public_id = :a"
                ),
                {"a": byok},
            )
        ).one()
        generations = await conn.scalar(
            text("SELECT count(*) FROM generations WHERE generation_id = :g"), {"g": repeated.generation_id}
        )
        assert await verify_ledger(conn) == {}
    # the first charge (0.30, alone) took the first lot down to 0.20; the batch's 0.40 takes that 0.20 and
    # 0.20 of the second lot; its last 0.30 empties the second; running balances follow posting order
    assert [(p.amount, p.balance_after) for p in postings] == [
        (Decimal("-0.2"), Decimal("0.5")),
        (Decimal("-0.2"), Decimal("0.3")),
        (Decimal("-0.3"), Decimal("0.0")),
    ]
    assert postings[0].lot_id != postings[1].lot_id and postings[1].lot_id == postings[2].lot_id
    assert lots == [Decimal("0"), Decimal("0")]
    assert month == (Decimal("25010"), 4, Decimal("0.5"))
    assert generations == 1
