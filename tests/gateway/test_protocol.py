"""`billing serve`'s HTTP protocol (billing/gateway/protocol.py): uvicorn's, with the gateway's spending calls
answered from their batch without an ASGI cycle. Here a real uvicorn server runs it in a thread, in front of
an app that records every request that reaches ASGI, and raw sockets speak HTTP/1.1 to it: which requests
the protocol serves, that its bytes are the ASGI path's, and keep-alive, pipelining, a body that arrives
late, `Connection: close`, `Expect: 100-continue` and a client that hangs up before its answer."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from billing.settings import Settings
from tests.conftest import Api
from tests.gateway.conftest import funded

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


class Recording:
    """The ASGI app, recording the path of every HTTP request that reaches it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@dataclasses.dataclass
class Server:
    port: int
    app: Recording
    uvicorn: uvicorn.Server

    def until(self, condition: Any) -> None:
        """Until `condition(protocol)` holds for one of the server's connections (polled, with a deadline)."""
        deadline = time.monotonic() + 20
        while not any(condition(p) for p in list(self.uvicorn.server_state.connections)):
            assert time.monotonic() < deadline, "the server never reached the state waited for"
            time.sleep(0.005)


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[Server]:
    from billing.app import create_asgi
    from billing.gateway.protocol import GatewayProtocol

    # (the suite's settings cache no token; a gateway's token is in the cache after its first request)
    app = Recording(create_asgi(dataclasses.replace(settings, token_cache_seconds=300)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=GatewayProtocol, log_level="warning", server_header=False
    )
    serving = uvicorn.Server(config)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not serving.started:  # readiness with a deadline, not a timing assumption
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Server(port, app, serving)
    serving.should_exit = True
    thread.join(30)


class Connection:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def send(self, *parts: bytes) -> None:
        for part in parts:
            self.sock.sendall(part)

    def reply(self) -> Reply:
        status = int(self.file.readline().split()[1])
        headers = []
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, value = line.rstrip(b"\r\n").split(b": ", 1)
            headers.append((name.lower(), value))
        length = int(dict(headers).get(b"content-length", b"0"))
        return status, headers, self.file.read(length)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def request(path: str, body: dict[str, Any], token: str, *, chunked: bool = False, extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
    if chunked:  # no Content-Length: the protocol leaves it to the ASGI path
        return (head + extra + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(payload),
            payload,
        )
    return (head + extra + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def without_date(reply: Reply) -> Reply:
    status, headers, body = reply
    return status, [h for h in headers if h[0] != b"date"], body


async def gateway_token(api: Api) -> str:
    return (await api.token(["gateway"]))["Authorization"].removeprefix("Bearer ")


async def test_spending_calls_skip_asgi_and_answer_its_bytes(api: Api, server: Server) -> None:
    port, app = server.port, server.app
    account = await funded(api, "1.00")
    token = await gateway_token(api)
    conn = Connection(port)
    try:

        def both(path: str, body: dict[str, Any]) -> tuple[Reply, Reply]:
            """The same call served by the protocol, then through ASGI (its chunked twin); the paths seen."""
            before = len(app.paths)
            conn.send(request(path, body, token))
            served = conn.reply()
            assert app.paths[before:] == []
            conn.send(request(path, body, token, chunked=True))
            through_asgi = conn.reply()
            assert app.paths[before:] == [path]
            return without_date(served), without_date(through_asgi)

        first = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.10"}
        conn.send(request("/v1/charges", first, token))  # the token's first request: looked up through ASGI
        assert conn.reply()[0] == 201 and app.paths[-1] == "/v1/charges"

        charge = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.20"}
        before = len(app.paths)
        conn.send(request("/v1/charges", charge, token))
        status, headers, body = conn.reply()
        assert status == 201 and app.paths[before:] == [] and (b"idempotent-replayed", b"true") not in headers
        assert json.loads(body)["total_cost"] == "0.20"
        assert [name for name, _ in headers] == [b"date", b"content-type", b"content-length"]

        replay, replay_asgi = both("/v1/charges", charge)  # a replay, answered the same both ways
        assert replay == replay_asgi and replay[0] == 201 and (b"idempotent-replayed", b"true") in replay[1]
        assert json.loads(replay[2]) == json.loads(body)
        too_big = {"account": account, "request_id": f"r-{uuid.uuid4().hex}", "amount": "5.00"}
        conn.send(request("/v1/holds", too_big, token))
        status, headers, body = conn.reply()
        assert status == 402 and json.loads(body)["error"]["limit_source"] == "credits"
        refusal, refusal_asgi = both("/v1/holds", too_big)  # the refusal's replays
        assert refusal == refusal_asgi and refusal[0] == 402 and json.loads(refusal[2]) == json.loads(body)
        bad, bad_asgi = both("/v1/charges", {**charge, "generation_id": "gen-negative", "cost": "-0.01"})
        assert bad == bad_asgi and bad[0] == 400

        before = len(app.paths)
        conn.send(
            request("/v1/holds", {"account": account, "request_id": f"r-{uuid.uuid4().hex}", "amount": "0.30"}, token)
        )
        status, _, body = conn.reply()
        assert status == 201
        capture = {"generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.05"}
        conn.send(request(f"/v1/holds/{json.loads(body)['id']}/capture", capture, token))
        status, _, body = conn.reply()
        assert status == 200 and json.loads(body)["generation"]["total_cost"] == "0.05"
        assert app.paths[before:] == []
    finally:
        conn.close()
    assert (await api.balance(account))["balance"] == "0.65"  # 1.00 − 0.10 − 0.20 − 0.05, each once


async def test_keep_alive_pipelining_a_late_body_and_connection_close(api: Api, server: Server) -> None:
    port, app = server.port, server.app
    account = await funded(api, "1.00")
    token = await gateway_token(api)
    ids = [f"gen-{uuid.uuid4().hex}" for _ in range(5)]

    def charge(n: int, **options: Any) -> bytes:
        return request("/v1/charges", {"account": account, "generation_id": ids[n], "cost": "0.01"}, token, **options)

    conn = Connection(port)
    try:
        conn.send(charge(0))
        assert conn.reply()[0] == 201  # (the token's first request, through ASGI)
        before = len(app.paths)
        conn.send(charge(1) + charge(2) + charge(3))  # pipelined: answered in order
        answers = [conn.reply() for _ in range(3)]
        assert [(status, json.loads(body)["id"]) for status, _, body in answers] == [(201, i) for i in ids[1:4]]
        whole = charge(4, extra="Connection: close\r\n")
        split = whole.index(b"\r\n\r\n") + 4
        conn.send(whole[:split])  # the headers; the body once the server waits for it
        server.until(lambda protocol: protocol._waiting is not None)
        conn.send(whole[split:])
        status, headers, _ = conn.reply()
        assert status == 201 and (b"connection", b"close") in headers
        assert conn.file.read(1) == b""  # the server closed the connection after its answer
        assert app.paths[before:] == []
    finally:
        conn.close()
    assert (await api.balance(account))["balance"] == "0.95"


async def test_expect_100_continue_is_left_to_uvicorn(api: Api, server: Server) -> None:
    port, app = server.port, server.app
    account = await funded(api, "1.00")
    token = await gateway_token(api)
    whole = request("/v1/charges", {"account": account, "cost": "0.01", "generation_id": f"gen-{uuid.uuid4().hex}"},
                    token, extra="Expect: 100-continue\r\n")  # fmt: skip
    split = whole.index(b"\r\n\r\n") + 4
    conn = Connection(port)
    try:
        conn.send(whole[:split])
        assert conn.file.readline() == b"HTTP/1.1 100 Continue\r\n" and conn.file.readline() == b"\r\n"
        conn.send(whole[split:])
        assert conn.reply()[0] == 201 and app.paths[-1] == "/v1/charges"
    finally:
        conn.close()


async def test_a_client_that_hangs_up_before_its_answer_finds_its_charge_on_retry(api: Api, server: Server) -> None:
    port = server.port
    account = await funded(api, "1.00")
    token = await gateway_token(api)
    warm = Connection(port)
    warm.send(
        request("/v1/charges", {"account": account, "cost": "0.01", "generation_id": f"g-{uuid.uuid4().hex}"}, token)
    )
    assert warm.reply()[0] == 201  # the token is in the server's cache now: the next call is the protocol's
    warm.close()
    body = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.25"}
    gone = Connection(port)
    gone.send(request("/v1/charges", body, token))
    gone.close()  # before any answer
    retry = Connection(port)
    try:
        retry.send(request("/v1/charges", body, token))
        status, _, answer = retry.reply()
    finally:
        retry.close()
    assert status == 201 and json.loads(answer)["id"] == body["generation_id"]
    assert (await api.balance(account))["balance"] == "0.74"  # charged once, whichever request wrote it
