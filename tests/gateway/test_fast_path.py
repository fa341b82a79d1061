"""The gateway's three spending calls are served in front of Litestar (billing/gateway/fast.py); every other
request, and every one of those it cannot serve whole, reaches Litestar untouched. The whole suite runs
through it (the test client wraps `create_asgi`); here: which requests it serves, and that what it answers
is byte for byte what the Litestar route answers for the same outcome."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from billing.gateway.fast import GatewayFastPath
from billing.settings import Settings
from tests.conftest import Api, served
from tests.gateway.conftest import Gateway, funded


@pytest.fixture
def fast(client: AsyncTestClient) -> GatewayFastPath:
    assert isinstance(client.app, GatewayFastPath)
    return client.app


async def test_charge_hold_capture_and_their_replays_are_served_in_front(
    api: Api, gw: Gateway, fast: GatewayFastPath
) -> None:
    account = await funded(api, "1.00")
    before = fast.served
    charge = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.10"}
    first = await gw.charge(**charge)
    again = await gw.charge(expect=201, **charge)
    hold = (await gw.hold(account=account, amount="0.20")).json()
    captured = await gw.capture(hold["id"], cost="0.05")
    refused = await gw.hold(expect=402, account=account, amount="5.00")
    assert fast.served == before + 5
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    assert first.headers["content-type"] == "application/json"
    assert captured.json()["generation"]["total_cost"] == "0.05"
    assert refused.json()["error"]["limit_source"] == "credits"
    assert (await api.balance(account))["balance"] == "0.85"


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"cost": "0.01"}, 401, "missing_token"),
        ({"Authorization": "Bearer nope"}, {"cost": "0.01"}, 401, "invalid_token"),
        (None, {"cost": 0.01}, 400, "invalid_parameter"),  # a JSON number does not decode: Litestar's 400
        (None, {"cost": "0.01", "surprise": 1}, 400, "invalid_parameter"),
    ],
)
async def test_what_it_cannot_serve_is_answered_by_litestar(
    api: Api,
    gw: Gateway,
    client: AsyncTestClient,
    fast: GatewayFastPath,
    headers: dict[str, str] | None,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    account = await funded(api, "1.00")
    before = fast.served
    r = await client.post(
        "/v1/charges",
        json={"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", **body},
        headers=gw.headers if headers is None else headers,
    )
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert fast.served == before
    assert (await api.balance(account))["balance"] == "1.00"


async def test_a_failed_token_lookup_is_answered_by_litestar(
    api: Api, client: AsyncTestClient, fast: GatewayFastPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token whose lookup fails (the database unreachable) is Litestar's to answer, with the error object any
    of its routes answers it with (from the fast path, the error escaped the app: uvicorn's plain-text 500)."""
    headers = await api.token(["gateway"])  # (this suite caches no token: each request looks it up)

    async def unreachable(*_: Any) -> Any:
        raise psycopg.OperationalError("the database is unreachable")

    monkeypatch.setattr(fast.app.state.tokens, "_fetch", unreachable)
    route = await client.get("/v1/generations/gen-x", headers=headers)
    assert (route.status_code, route.json()["error"]["code"]) == (500, "internal_error")
    before = fast.served
    r = await client.post(
        "/v1/charges", json={"account": "acct_x", "generation_id": "gen-x", "cost": "0.01"}, headers=headers
    )
    assert (r.status_code, r.json()) == (500, route.json())
    assert fast.served == before


async def test_a_scope_that_may_not_spend_is_refused_by_litestar(
    api: Api, client: AsyncTestClient, fast: GatewayFastPath
) -> None:
    account = await funded(api, "1.00")
    support = await api.token(["support"])
    before = fast.served
    r = await client.post(
        "/v1/holds", json={"account": account, "request_id": "r-1", "amount": "0.10"}, headers=support
    )
    assert (r.status_code, r.json()["error"]["code"]) == (403, "insufficient_scope")
    assert fast.served == before


async def test_its_answers_are_the_litestar_routes_answers(
    api: Api, gw: Gateway, client: AsyncTestClient, fast: GatewayFastPath
) -> None:
    """The same requests answered by the Litestar route (the fast path steps aside for a body it does not
    read) and by the fast path, byte for byte: replays of a charge and of a refusal, and an ApiError."""
    account = await funded(api, "1.00")
    calls = [
        {"account": account, "generation_id": "gen-same-1", "cost": "0.10"},
        {"account": account, "generation_id": "gen-same-2", "cost": "0.95"},  # refused: 0.90 left
        {"account": "acct_unknown", "generation_id": "gen-same-3", "cost": "0.10"},
    ]
    first = [(await gw.charge(expect=None, **body)).status_code for body in calls]
    assert first == [201, 402, 404]

    async def answers(content_type: str) -> list[tuple[int, bytes, str | None, str]]:
        out = []
        for body in calls:
            r = await client.post(
                "/v1/charges", content=json.dumps(body), headers={**gw.headers, "Content-Type": content_type}
            )
            out.append((r.status_code, r.content, r.headers.get("idempotent-replayed"), r.headers["content-type"]))
        return out

    before = fast.served
    by_litestar = await answers("text/plain")
    assert fast.served == before
    by_fast_path = await answers("application/json")
    assert fast.served == before + 3
    assert by_fast_path == by_litestar
    assert [a[2] for a in by_litestar] == ["true", "true", None]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_body_larger_than_any_gateway_call_is_left_to_litestars_limit(
    client: AsyncTestClient, fast: GatewayFastPath, gw: Gateway, declared: bool
) -> None:
    """The fast path does not buffer what it cannot serve: a body over MAX_BODY goes to Litestar, unread
    when its length is declared, and Litestar's own limit (10 MB) refuses it with a 413 while reading."""
    chunk, chunks = b" " * 1_000_000, 100
    consumed = 0
    answer: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal consumed
        consumed += 1
        return {"type": "http.request", "body": chunk, "more_body": consumed < chunks}

    async def send(message: dict[str, Any]) -> None:
        answer.append(message)

    headers = [(b"authorization", gw.headers["Authorization"].encode()), (b"content-type", b"application/json")]
    if declared:
        headers.append((b"content-length", str(len(chunk) * chunks).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/charges", "raw_path": b"/v1/charges", "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def call() -> None:
        await fast(scope, receive, send)

    client.blocking_portal.call(call)
    assert answer[0]["status"] == 413
    assert consumed <= (1 if declared else 12), consumed  # 10 MB and the first chunk past it, at most


async def test_a_charge_naming_no_payer_is_answered_by_litestar(
    client: AsyncTestClient, fast: GatewayFastPath, gw: Gateway
) -> None:
    before = fast.served
    r = await client.post("/v1/charges", json={"generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.01"},
                          headers=gw.headers)  # fmt: skip
    assert r.status_code == 400 and "account" in r.json()["error"]["message"]
    assert fast.served == before


async def test_with_batching_off_every_call_is_litestars(api: Api, settings: Settings) -> None:
    from billing.app import create_asgi

    account = await funded(api, "1.00")
    headers = await api.token(["gateway"])
    unbatched = create_asgi(dataclasses.replace(settings, charge_batching=False))
    async with served(unbatched) as client:
        charge = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.10"}
        assert (await client.post("/v1/charges", json=charge, headers=headers)).status_code == 201
        hold = {"account": account, "request_id": f"r-{uuid.uuid4().hex}", "amount": "0.20"}
        held = await client.post("/v1/holds", json=hold, headers=headers)
        assert held.status_code == 201
        capture = {"generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.05"}
        r = await client.post(f"/v1/holds/{held.json()['id']}/capture", json=capture, headers=headers)
        assert r.status_code == 200
    assert unbatched.served == 0
    assert (await api.balance(account))["balance"] == "0.85"
