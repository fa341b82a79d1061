"""`billing serve`'s HTTP protocol (billing/gateway/protocol.py): uvicorn's, with the gateway's spending calls
answered from their batch without an ASGI cycle. Here a real uvicorn server runs it in a thread, in front of
an app that records every request that reaches ASGI, and raw sockets speak HTTP/1.1 to it: which requests
the protocol serves, that its bytes are the ASGI path's, and keep-alive, pipelining (behind a refusal too), a
body that arrives late, `Connection: close`, `Expect: 100-continue` and a client that hangs up before its
answer; and, on a transport of the test's own, requests parsed in one go and a client that does not read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import uvicorn
from litestar.testing import AsyncTestClient
from uvicorn.server import ServerState

from billing.settings import Settings
from tests.conftest import ADMIN_TOKEN, Api, uvicorn_thread
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

    def until(self, condition: Any) -> Any:
        """Until `condition(protocol)` holds for one of the server's connections (polled, with a deadline);
        that connection's protocol."""
        deadline = time.monotonic() + 20
        while not (found := [p for p in list(self.uvicorn.server_state.connections) if condition(p)]):
            assert time.monotonic() < deadline, "the server never reached the state waited for"
            time.sleep(0.005)
        return found[0]


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[Server]:
    from billing.app import create_asgi

    # (the suite's settings cache no token; a gateway's token is in the cache after its first request)
    app = Recording(create_asgi(dataclasses.replace(settings, token_cache_seconds=300)))
    with uvicorn_thread(app) as (port, serving):
        yield Server(port, app, serving)


class Unread(asyncio.Transport):
    """A connection's transport whose peer reads nothing: what is written stays here. A test says when its
    buffer is over the high-water mark and under it again, with the protocol's `pause_writing` and
    `resume_writing`."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
async def unread(client: AsyncTestClient) -> AsyncIterator[tuple[Any, Unread]]:
    """The protocol on an `Unread` transport, in front of the suite's app in the test's own event loop: what
    the test hands to `data_received` in one call is parsed in one go."""
    from billing.gateway.protocol import GatewayProtocol

    config = uvicorn.Config(client.app, http=GatewayProtocol, log_config=None, server_header=False)
    config.load()
    protocol = GatewayProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = Unread()
    protocol.connection_made(transport)
    assert protocol.fast is not None
    yield protocol, transport
    protocol.connection_lost(None)


async def until(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds, the event loop running meanwhile (for a bounded number of its turns)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the protocol never reached the state waited for")


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


def refused(token: str) -> bytes:
    """A charge refused before it joins a batch (a negative cost): its error is known at once."""
    return request("/v1/charges", {"account": "acct_x", "generation_id": "gen-x", "cost": "-0.01"}, token)


def lock_balance(settings: Settings, account: str) -> psycopg.Connection[Any]:
    """A transaction holding the account's balance row: its charges wait in their batch until it ends."""
    conn = psycopg.connect(settings.database_url)
    conn.execute(
        "SELECT 1 FROM balances WHERE account_id = (SELECT id FROM accounts WHERE public_id = %s) FOR UPDATE",
        (account,),
    )
    return conn


def without_date(reply: Reply) -> Reply:
    status, headers, body = reply
    return status, [h for h in headers if h[0] != b"date"], body


async def gateway_token(api: Api) -> str:
    return (await api.token(["gateway"]))["Authorization"].removeprefix("Bearer ")


async def warm_token(api: Api, server: Server, account: str) -> str:
    """A gateway token in the server's cache, after a charge of 0.01 through ASGI: the protocol's from now."""
    token = await gateway_token(api)
    first = {"account": account, "generation_id": f"g-{uuid.uuid4().hex}", "cost": "0.01"}
    warm = Connection(server.port)
    try:
        warm.send(request("/v1/charges", first, token))
        assert warm.reply()[0] == 201
    finally:
        warm.close()
    return token


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
    token = await warm_token(api, server, account)
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


async def test_no_idle_timer_runs_under_a_call_pipelined_behind_a_refusal(
    api: Api, server: Server, settings: Settings
) -> None:
    """A refusal known at once is answered after the bytes at hand are parsed, so the call pipelined behind it
    is in uvicorn's queue when that answer completes the cycle: the keep-alive timer is not armed under it
    (it closed the connection under a charge that went on to commit, and its answer was lost)."""
    account = await funded(api, "1.00")
    token = await warm_token(api, server, account)
    charge = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.10"}
    lock = lock_balance(settings, account)
    conn = Connection(server.port)
    local = conn.sock.getsockname()
    try:
        conn.send(refused(token) + request("/v1/charges", charge, token))  # one write: parsed together
        assert conn.reply()[0] == 400
        # the charge is the connection's request now, waiting on the lock in its batch
        serving = server.until(lambda p: p.client == local and not p.cycle.response_complete)
        assert serving.timeout_keep_alive_task is None
        lock.rollback()
        status, _, body = conn.reply()
        assert status == 201 and json.loads(body)["id"] == charge["generation_id"]
    finally:
        lock.close()
        conn.close()
    assert (await api.balance(account))["balance"] == "0.89"


async def test_any_number_of_pipelined_refusals_are_answered_in_turn(unread: tuple[Any, Unread]) -> None:
    """Refusals waiting behind a request are answered one per turn of the event loop, not each inside the last
    one's completion: a thousand of them overflowed the stack, and the connection hung."""
    protocol, transport = unread
    n = 1000
    # (the bootstrap token: known without a lookup, so the refusals are the protocol's)
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + refused(ADMIN_TOKEN) * n)
    assert len(protocol.pipeline) == n  # behind the probe's ASGI task
    await until(lambda: transport.written.count(b"HTTP/1.1 ") == n + 1 or transport.closed)
    assert transport.written.count(b"HTTP/1.1 400 ") == n and not transport.closed


async def test_answers_wait_while_the_transport_has_paused_writing(unread: tuple[Any, Unread]) -> None:
    """As uvicorn's `send` waits for `drain`: an answer due while the transport's buffer is over its
    high-water mark is written once it is under again, and the requests pipelined behind it wait for it (a
    client that pipelined and never read had every answer buffered)."""
    protocol, transport = unread
    protocol.pause_writing()
    protocol.data_received(refused(ADMIN_TOKEN) * 3)
    await asyncio.sleep(0)  # one turn: the loop runs the first answer, scheduled before this task resumes
    assert transport.written == b"" and len(protocol.pipeline) == 2
    protocol.resume_writing()
    await until(lambda: transport.written.count(b"HTTP/1.1 ") == 3)
    assert transport.written.count(b"HTTP/1.1 400 ") == 3


async def test_an_outcome_that_does_not_encode_is_answered_with_a_500(
    api: Api, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome whose body does not encode is an unhandled error: a 500 with the error object, the same from
    the protocol as from the ASGI path (raised in its future's callback, it left the connection without an
    answer; through ASGI, uvicorn answered a plain-text 500 and closed it)."""
    account = await funded(api, "1.00")
    token = await warm_token(api, server, account)

    def unencodable(principal: Any, data: Any) -> Any:
        done = asyncio.get_running_loop().create_future()
        done.set_result((201, object(), False))
        return done

    monkeypatch.setattr(server.app.app.state.charge_batcher, "queue_charge", unencodable)
    body = {"account": account, "generation_id": f"gen-{uuid.uuid4().hex}", "cost": "0.01"}
    conn = Connection(server.port)
    try:
        conn.send(request("/v1/charges", body, token, chunked=True))  # through ASGI
        through_asgi = without_date(conn.reply())
        assert through_asgi[0] == 500 and (b"content-type", b"application/json") in through_asgi[1]
        assert json.loads(through_asgi[2])["error"]["code"] == "internal_error"
        conn.send(request("/v1/charges", body, token))
        assert without_date(conn.reply()) == through_asgi
    finally:
        conn.close()
