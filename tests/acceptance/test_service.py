"""Drive the running service the way its callers do: health, OpenAPI, concurrent staff grants."""

import asyncio
import uuid

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN


def test_health_and_readiness(live_url: str) -> None:
    assert httpx.get(f"{live_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{live_url}/readyz").json() == {"status": "ready"}
    for path in ("/healthz", "/readyz"):  # a probe may ask with HEAD: the same status, no body
        r = httpx.head(f"{live_url}{path}")
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)


def test_openapi_is_served_and_complete(live_url: str) -> None:
    doc = httpx.get(f"{live_url}/schema/openapi.json").json()
    paths = doc["paths"]
    for path in [
        "/v1/accounts",
        "/v1/accounts/{account_id}",
        "/v1/accounts/{account_id}/balance",
        "/v1/accounts/{account_id}/ledger",
        "/v1/accounts/{account_id}/lots",
        "/v1/accounts/{account_id}/grants",
        "/v1/accounts/{account_id}/adjustments",
        "/v1/journal_entries/{entry_id}",
        "/v1/tokens",
        "/v1/tokens/{token_id}",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths, path
    for path, operations in paths.items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            if path.startswith("/v1/") and not path.startswith("/v1/stripe/"):  # webhooks: signed, no token
                assert {"401", "403"} <= statuses, (method, path, statuses)
            if method == "post":
                assert "400" in statuses, (method, path)
            if "{" in path:
                assert "404" in statuses, (method, path)
    for path in ("/healthz", "/readyz"):  # public: the document says so instead of asking for a token
        assert paths[path]["get"]["security"] == [{}], path
    money = doc["components"]["schemas"]["CreateGrant"]["properties"]["amount"]
    assert money["type"] == "string"


async def test_fifty_concurrent_grants_with_one_key_make_one_entry(live_url: str, engine: AsyncEngine) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=30) as http:
        account = (await http.post("/v1/accounts", json={"external_id": f"race_{uuid.uuid4().hex}"})).json()["id"]
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {"amount": "1.00", "reason": "race"}
        responses = await asyncio.gather(
            *[http.post(f"/v1/accounts/{account}/grants", json=body, headers=headers) for _ in range(50)]
        )
        assert [r.status_code for r in responses] == [201] * 50
        assert len({r.json()["entry"]["id"] for r in responses}) == 1
        assert (await http.get(f"/v1/accounts/{account}/balance")).json()["balance"] == "1.00"
    async with engine.connect() as conn:
        entries = await conn.scalar(
            text(
                "SELECT count(*) FROM journal_entries e JOIN accounts a ON a.id = e.account_id WHERE a.public_id = :p"
            ),
            {"p": account},
        )
    assert entries == 1


async def test_fifty_concurrent_grants_with_distinct_keys_all_land(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=30) as http:
        account = (await http.post("/v1/accounts", json={"external_id": f"many_{uuid.uuid4().hex}"})).json()["id"]
        responses = await asyncio.gather(
            *[
                http.post(
                    f"/v1/accounts/{account}/grants",
                    json={"amount": "0.01", "reason": "many"},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                for _ in range(50)
            ]
        )
        assert [r.status_code for r in responses] == [201] * 50
        ledger = (await http.get(f"/v1/accounts/{account}/ledger", params={"limit": 100})).json()["data"]
        assert (await http.get(f"/v1/accounts/{account}/balance")).json()["balance"] == "0.50"
    # The running balance walks down by exactly one cent per entry, newest first: no lost update.
    assert [line["balance_after"] for line in ledger] == [f"0.{n:02d}" for n in range(50, 0, -1)]
