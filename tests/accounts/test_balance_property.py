"""Property: after any sequence of grants and adjustments, the cached balance, every lot's remainder and
every running balance agree with the postings, and the balance matches a plain model of the rules."""

import uuid
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.ledger.money import format_money
from billing.verify import verify_ledger
from tests.conftest import ADMIN

money = st.decimals(min_value=Decimal("0.000000000001"), max_value=Decimal("5000"), places=12)
op = st.tuples(st.sampled_from(["grant", "adjust_up", "adjust_down"]), money)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=8))
async def test_cached_balance_equals_postings(client: AsyncTestClient, engine: AsyncEngine, ops) -> None:  # type: ignore[no-untyped-def]
    r = await client.post("/v1/accounts", json={"external_id": f"prop_{uuid.uuid4().hex}"}, headers=ADMIN)
    acct = r.json()["id"]
    expected = Decimal(0)
    for kind, amount in ops:
        headers = {**ADMIN, "Idempotency-Key": uuid.uuid4().hex}
        if kind == "grant":
            path, body = "grants", {"amount": format_money(amount), "reason": "p"}
        else:
            signed = amount if kind == "adjust_up" else -amount
            path, body = "adjustments", {"amount": format_money(signed), "reason": "p"}
        r = await client.post(f"/v1/accounts/{acct}/{path}", json=body, headers=headers)
        if kind == "adjust_down" and amount > expected:
            assert r.status_code == 402
        else:
            assert r.status_code == 201, r.text
            expected += amount if kind != "adjust_down" else -amount
    balance = (await client.get(f"/v1/accounts/{acct}/balance", headers=ADMIN)).json()
    assert balance["balance"] == format_money(expected)
    async with engine.connect() as conn:
        summed = await conn.scalar(
            text(
                "SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN accounts a ON a.id = p.account_id WHERE a.public_id = :a"
            ),
            {"a": acct},
        )
        lots = await conn.scalar(
            text(
                "SELECT coalesce(sum(l.remaining), 0) FROM lots l JOIN accounts a ON a.id = l.account_id WHERE a.public_id = :a"
            ),
            {"a": acct},
        )
        assert summed == expected and lots == expected
        assert await verify_ledger(conn) == {}
