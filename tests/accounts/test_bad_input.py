"""Bad input gets the right 4xx with a clear error body, and the database is unchanged (SPEC §3, §7)."""

from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api, key, snapshot

GRANT = {"amount": "5.00", "reason": "goodwill"}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({**GRANT, "amount": 5.0}, 400, "invalid_parameter"),
        ({**GRANT, "amount": 5}, 400, "invalid_parameter"),
        ({**GRANT, "amount": "-5.00"}, 400, "amount_must_be_positive"),
        ({**GRANT, "amount": "0"}, 400, "amount_must_be_positive"),
        ({**GRANT, "amount": "0.00"}, 400, "amount_must_be_positive"),
        ({**GRANT, "amount": "1.0000000000001"}, 400, "too_precise"),
        ({**GRANT, "amount": "NaN"}, 400, "invalid_money"),
        ({**GRANT, "amount": "1e2"}, 400, "invalid_money"),
        ({**GRANT, "amount": "Infinity"}, 400, "invalid_money"),
        ({**GRANT, "amount": "5,00"}, 400, "invalid_money"),
        ({**GRANT, "amount": "100000000000000"}, 400, "amount_too_large"),
        ({**GRANT, "amount": ""}, 400, "invalid_money"),
        ({**GRANT, "amount": "5.00\n"}, 400, "invalid_money"),
        ({"reason": "no amount"}, 400, "invalid_parameter"),
        ({"amount": "5.00"}, 400, "invalid_parameter"),
        ({**GRANT, "reason": ""}, 400, "invalid_parameter"),
        ({**GRANT, "category": "gift"}, 400, "invalid_parameter"),
        ({**GRANT, "surprise": 1}, 400, "invalid_parameter"),
        ({**GRANT, "expires_at": "2001-01-01T00:00:00Z"}, 400, "expiry_in_past"),
        ({**GRANT, "expires_at": "2099-01-01T00:00:00"}, 400, "timezone_required"),
        ({**GRANT, "expires_at": "tomorrow"}, 400, "invalid_parameter"),
        ([GRANT], 400, "invalid_parameter"),
    ],
)
async def test_bad_grant_is_refused_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, body: Any, status: int, code: str
) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(f"/v1/accounts/{acct}/grants", json=body, headers={**ADMIN, **key()})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    ("amount", "status", "code"),
    [("0", 400, "amount_must_not_be_zero"), ("-0.00", 400, "amount_must_not_be_zero"), (-1, 400, "invalid_parameter")],
)
async def test_bad_adjustment_is_refused(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, amount: Any, status: int, code: str
) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments", json={"amount": amount, "reason": "x"}, headers={**ADMIN, **key()}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert await snapshot(engine) == before


@pytest.mark.parametrize("kind", ["grants", "adjustments"])
@pytest.mark.parametrize("expires_at", [BEYOND_YEAR_9999_UTC, "9001-01-01T00:00:00Z"])
async def test_an_expiry_outside_the_years_2000_to_9000_utc_is_refused_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, kind: str, expires_at: str
) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(
        f"/v1/accounts/{acct}/{kind}",
        json={"amount": "5.00", "reason": "x", "expires_at": expires_at},
        headers={**ADMIN, **key()},
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "expires_at")
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    ("as_of", "status"),
    [
        ("1999-12-31T23:59:59Z", 400),
        ("2000-01-01T00:00:00Z", 200),
        ("9000-12-31T23:59:59Z", 200),
        ("9001-01-01T00:00:00Z", 400),
        ("9000-12-31T23:00:00-01:00", 400),  # 9001-01-01T00:00:00Z
        (BEYOND_YEAR_9999_UTC, 400),
    ],
)
async def test_as_of_outside_the_years_2000_to_9000_utc_is_refused(
    api: Api, client: AsyncTestClient, as_of: str, status: int
) -> None:
    acct = (await api.account())["id"]
    r = await client.get(f"/v1/accounts/{acct}/balance", params={"as_of": as_of}, headers=ADMIN)
    assert r.status_code == status, r.text
    if status == 400:
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "as_of")


async def test_malformed_json_is_400(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(
        f"/v1/accounts/{acct}/grants",
        content=b'{"amount": "5.00", "reason": ',
        headers={**ADMIN, **key(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert await snapshot(engine) == before


async def test_unknown_account_is_404(client: AsyncTestClient, engine: AsyncEngine) -> None:
    before = await snapshot(engine)
    for path in ["", "/balance", "/ledger", "/lots"]:
        r = await client.get(f"/v1/accounts/acct_doesnotexist{path}", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    r = await client.post("/v1/accounts/acct_doesnotexist/grants", json=GRANT, headers={**ADMIN, **key()})
    assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    r = await client.get("/v1/accounts/stripe_clearing", headers=ADMIN)  # platform accounts are not customers
    assert r.status_code == 404
    assert await snapshot(engine) == before


async def test_money_move_without_idempotency_key_is_400(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(f"/v1/accounts/{acct}/grants", json=GRANT, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_key_required"
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_token"),
        ({"Authorization": "Bearer nope"}, "invalid_token"),
        ({"Authorization": "Basic x"}, "missing_token"),
    ],
)
async def test_missing_or_wrong_token_is_401(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, headers: dict[str, str], code: str
) -> None:
    acct = (await api.account())["id"]
    before = await snapshot(engine)
    r = await client.post(f"/v1/accounts/{acct}/grants", json=GRANT, headers={**headers, **key()})
    assert r.status_code == 401 and r.json()["error"] == {
        "type": "authentication_error",
        "code": code,
        "message": r.json()["error"]["message"],
    }
    assert await snapshot(engine) == before


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": ["superuser"]},
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["account"]},
        {"name": "x", "scopes": ["gateway"], "account": "acct_x"},
        {"name": "", "scopes": ["gateway"]},
    ],
)
async def test_bad_token_request_is_400(client: AsyncTestClient, engine: AsyncEngine, body: dict[str, Any]) -> None:
    before = await snapshot(engine)
    r = await client.post("/v1/tokens", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert await snapshot(engine) == before


async def test_unknown_route_and_method(client: AsyncTestClient) -> None:
    r = await client.get("/v1/nothing", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.put("/v1/accounts", headers=ADMIN)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "body",
    [
        {"external_id": "nul-name", "kind": "user", "name": "Ada\x00"},
        {"external_id": "nul-value", "kind": "user", "metadata": {"plan": "pro\x00"}},
        {"external_id": "nul-key", "kind": "user", "metadata": {"\x00": "x"}},
    ],
)
async def test_text_with_a_nul_character_is_400(
    client: AsyncTestClient, engine: AsyncEngine, body: dict[str, Any]
) -> None:
    """PostgreSQL cannot store NUL in text or JSON; the caller hears so, instead of a 500."""
    before = await snapshot(engine)
    r = await client.post("/v1/accounts", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unstorable_text"
    assert await snapshot(engine) == before


async def test_a_nul_character_in_a_query_parameter_is_400(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    r = await client.get(f"/v1/accounts/{acct}/purchases", params={"starting_after": "pur_\x00"}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unstorable_text"


@pytest.mark.parametrize("external_id", ["acme\n", "ac me", ""])
async def test_an_external_id_outside_printable_ascii_is_400(
    client: AsyncTestClient, engine: AsyncEngine, external_id: str
) -> None:
    """Ids are printable ASCII without spaces; a trailing newline is not one (Python's `$` would let it by)."""
    before = await snapshot(engine)
    r = await client.post("/v1/accounts", json={"external_id": external_id, "kind": "user"}, headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_parameter"
    assert await snapshot(engine) == before
