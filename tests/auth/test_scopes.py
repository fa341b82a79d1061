"""Scopes: an account-scoped token never sees or moves another account's money."""

import re
import uuid

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api, key, snapshot


async def test_account_token_sees_only_its_own_account(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    mine = (await api.account())["id"]
    theirs = (await api.account())["id"]
    await api.grant(mine, "1.00")
    await api.grant(theirs, "9.00")
    token = await api.token(["account"], account=mine)
    for path in ["", "/balance", "/ledger", "/lots"]:
        assert (await client.get(f"/v1/accounts/{mine}{path}", headers=token)).status_code == 200
        r = await client.get(f"/v1/accounts/{theirs}{path}", headers=token)
        assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    assert (await client.get(f"/v1/accounts/{mine}/balance", headers=token)).json()["balance"] == "1.00"
    before = await snapshot(engine)
    for target in (mine, theirs):
        r = await client.post(
            f"/v1/accounts/{target}/grants", json={"amount": "5.00", "reason": "x"}, headers={**token, **key()}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        r = await client.post(
            f"/v1/accounts/{target}/adjustments", json={"amount": "-1.00", "reason": "x"}, headers={**token, **key()}
        )
        assert r.status_code == 403
    assert (await client.get("/v1/tokens", headers=token)).status_code == 403
    assert (await client.post("/v1/accounts", json={"external_id": "x"}, headers=token)).status_code == 403
    assert await snapshot(engine) == before


async def test_gateway_reads_but_cannot_grant(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    gateway = await api.token(["gateway"])
    assert (await client.get(f"/v1/accounts/{acct}/balance", headers=gateway)).status_code == 200
    r = await client.post(
        f"/v1/accounts/{acct}/grants", json={"amount": "1.00", "reason": "x"}, headers={**gateway, **key()}
    )
    assert r.status_code == 403


async def test_support_grants_and_is_the_audited_actor(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    support = await api.token(["support"])
    r = await client.post(
        f"/v1/accounts/{acct}/grants", json={"amount": "1.00", "reason": "ticket"}, headers={**support, **key()}
    )
    assert r.status_code == 201 and r.json()["entry"]["actor"].startswith("t (tok_")
    assert (
        await client.post("/v1/tokens", json={"name": "x", "scopes": ["admin"]}, headers=support)
    ).status_code == 403


async def test_tokens_are_stored_hashed_and_revocable(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    r = await client.post("/v1/tokens", json={"name": f"gw-{uuid.uuid4().hex}", "scopes": ["gateway"]}, headers=ADMIN)
    minted = r.json()
    secret = minted["secret"]
    from sqlalchemy import text

    async with engine.connect() as conn:
        stored = (
            await conn.execute(text("SELECT token_hash FROM api_tokens WHERE public_id = :p"), {"p": minted["id"]})
        ).scalar_one()
    assert secret not in stored and len(stored) == 64
    listed = (await client.get("/v1/tokens", headers=ADMIN)).json()["data"]
    assert all("secret" not in t for t in listed) and minted["id"] in {t["id"] for t in listed}
    acct = (await api.account())["id"]
    bearer = {"Authorization": f"Bearer {secret}"}
    assert (await client.get(f"/v1/accounts/{acct}", headers=bearer)).status_code == 200
    assert (await client.delete(f"/v1/tokens/{minted['id']}", headers=ADMIN)).json()["revoked_at"] is not None
    r = await client.get(f"/v1/accounts/{acct}", headers=bearer)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"


async def test_a_token_expiring_after_the_year_9000_utc_is_refused(
    client: AsyncTestClient, engine: AsyncEngine
) -> None:
    before = await snapshot(engine)
    r = await client.post(
        "/v1/tokens", json={"name": "t", "scopes": ["support"], "expires_at": BEYOND_YEAR_9999_UTC}, headers=ADMIN
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "expires_at")
    assert await snapshot(engine) == before


async def test_options_answers_every_path_and_opens_nothing(client: AsyncTestClient) -> None:
    """OPTIONS (a browser's CORS preflight carries no token) lists a path's methods on every route; the
    scope guards let only that method through, so the same paths still refuse a call without a token."""
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    assert len(paths) > 20
    for template, operations in paths.items():
        path = re.sub(r"\{[^}]+\}", "x", template)
        for headers in ({}, ADMIN):
            r = await client.options(path, headers=headers)
            assert r.status_code == 204, (path, r.status_code, r.text)
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            # (Litestar lists the methods of one of the handlers that share a path, not always all of them)
            assert "OPTIONS" in allowed and allowed & {m.upper() for m in operations}, (path, allowed)
        if template.startswith("/v1/") and template != "/v1/stripe/webhooks":
            method = next(iter(operations))
            r = await client.request(method.upper(), path)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "missing_token"
