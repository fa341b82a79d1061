"""The benchmark's load generator against a tiny HTTP/1.1 server started here: every request it makes is
counted exactly once on both sides, latencies are recorded, and broken connections, 404s, chunked bodies
and `Connection: close` are handled without crashing. No assertion depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from billing.bench.loadgen import (
    OP_ERROR,
    TRANSPORT,
    Call,
    LoadGenerator,
    Op,
    Response,
    parse_response,
    percentile_ms,
)

SLOW_S = 0.05


@dataclass
class TinyServer:
    """Keep-alive HTTP/1.1. `/ok` 200, `/echo` 201 echoing the body, `/thing/<x>` 200 `x`, `/slow` 200
    after SLOW_S, `/chunked` a chunked 200, `/close` 200 then closes, `/drop` closes without answering,
    anything else 404."""

    requests: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                method, path, _ = lines[0].split(" ")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.requests[f"{method} {path}"] += 1
                close = False
                if path == "/drop":
                    return
                if path == "/ok":
                    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                elif path == "/echo":
                    answer = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                elif path.startswith("/thing/"):
                    thing = path.removeprefix("/thing/").encode()
                    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(thing), thing)
                elif path == "/slow":
                    await asyncio.sleep(SLOW_S)
                    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"
                elif path == "/chunked":
                    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
                elif path == "/close":
                    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"
                    close = True
                else:
                    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                writer.write(answer)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def tiny() -> AsyncIterator[TinyServer]:
    server = TinyServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


def total(counts: dict[str, dict[str, int]]) -> int:
    return sum(sum(by_status.values()) for by_status in counts.values())


async def test_closed_loop_counts_every_request_once_and_records_latencies(tiny: TinyServer) -> None:
    def op(seq: int) -> Op:
        response = yield Call("ok", "GET", "/ok")
        assert response.body == b"ok"

    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=4, duration=0.3)

    sent = tiny.requests["GET /ok"]
    assert sent > 0
    assert result.status_counts() == {"ok": {"200": sent}}
    assert result.errors() == 0 and result.failed_ops == 0
    assert 0 < result.ops <= sent
    assert 0 < len(result.op_latencies_ns) == result.ops
    assert 0 < len(result.calls["ok"].latencies_ns) <= sent
    assert all(latency > 0 for latency in result.op_latencies_ns + result.calls["ok"].latencies_ns)
    assert tiny.connections == 4  # keep-alive: one connection per worker, reused


async def test_open_loop_sends_exactly_the_scheduled_operations(tiny: TinyServer) -> None:
    def op(seq: int) -> Op:
        yield Call("ok", "GET", "/ok")

    # 200 operations per second for 0.5 s: slots 0..99, whatever the timing.
    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=3, duration=0.5, rate=200)

    assert result.scheduled == 100
    assert tiny.requests["GET /ok"] == 100
    assert result.status_counts() == {"ok": {"200": 100}}
    assert result.ops == 100 == len(result.op_latencies_ns) == len(result.send_lag_ns)
    assert len(result.calls["ok"].latencies_ns) == 100
    assert all(lag >= 0 for lag in result.send_lag_ns)
    assert result.ops_per_s == 200


async def test_an_operation_sent_before_its_time_is_measured_from_its_sending(
    tiny: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's timers count whole milliseconds and can wake the generator before an operation's scheduled
    time. Its latency then counts from when it was sent: from the later scheduled time, the part of the
    server's answer that came before it would be left out."""
    from billing.bench import loadgen

    async def too_early(due_ns: int) -> None:  # every wake-up comes early: each operation goes out at once
        return None

    monkeypatch.setattr(loadgen, "wait_until", too_early)

    def op(seq: int) -> Op:
        yield Call("slow", "GET", "/slow")

    # 20 operations scheduled over 0.5 s, all sent at the start; the server answers each after SLOW_S.
    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=20, duration=0.5, rate=40)

    assert tiny.requests["GET /slow"] == 20 == result.ops == len(result.op_latencies_ns)
    assert min(result.send_lag_ns) < 0  # they went out before their time
    # Every answer took SLOW_S after its request (less a little for a timer, as slack); measured from the
    # later scheduled time, those due after it would show less, down to below zero.
    assert min(result.op_latencies_ns) >= 0.9 * SLOW_S * 1e9
    assert min(result.calls["slow"].latencies_ns) >= 0.9 * SLOW_S * 1e9


async def test_no_full_collection_runs_inside_a_run(tiny: TinyServer) -> None:
    """A full pass of the collector inside a run would pause every connection at once, and open loop
    would count the pause as the server's latency."""
    full_passes: list[int] = []
    thresholds = gc.get_threshold()

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full_passes.append(1)

    def op(seq: int) -> Op:
        # garbage in cycles, enough to trigger many young collections and, unchecked, full ones
        for _ in range(200):
            a: list[object] = []
            a.append(a)
        if seq == 0:
            assert gc.get_freeze_count() > 0  # what was alive before the run is out of the collector's way
        yield Call("ok", "GET", "/ok")

    gc.set_threshold(100, 2, 2)  # unchecked, a full pass every few hundred allocations
    gc.callbacks.append(watch)
    try:
        result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.3, rate=200)
        assert gc.get_threshold() == (100, 2, 2)  # restored after the run
    finally:
        gc.callbacks.remove(watch)
        gc.set_threshold(*thresholds)
    assert result.ops == 60
    assert full_passes == [1]  # the one before the run starts, none inside it
    assert gc.get_freeze_count() == 0


async def test_dependent_calls_get_the_previous_response(tiny: TinyServer) -> None:
    seen: list[str] = []

    def op(seq: int) -> Op:
        first = yield Call("create", "POST", "/echo", json.dumps({"id": f"thing{seq}"}).encode())
        thing = json.loads(first.body)["id"]
        second = yield Call("use", "GET", f"/thing/{thing}")
        seen.append(second.body.decode())

    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.2)

    creates = tiny.requests["POST /echo"]
    assert creates > 0
    assert result.status_counts() == {"create": {"201": creates}, "use": {"200": creates}}
    assert sorted(seen) == sorted(f"thing{seq}" for seq in range(creates))
    assert sum(n for key, n in tiny.requests.items() if key.startswith("GET /thing/")) == creates
    assert result.calls["create"].latencies_ns and result.calls["use"].latencies_ns


async def test_errors_are_counted_not_raised(tiny: TinyServer) -> None:
    unanswered: list[int] = []

    def op(seq: int) -> Op:
        answered = False
        try:
            yield Call("call", "GET", "/drop" if seq % 2 else "/missing")
            answered = True
        finally:
            if not answered:
                unanswered.append(seq)

    # Open loop, so exactly operations 0..19 run whatever the machine's speed (closed loop for 0.2 s
    # once sent no /drop at all on a loaded machine).
    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.2, rate=100)

    drops, missing = tiny.requests["GET /drop"], tiny.requests["GET /missing"]
    assert (drops, missing) == (10, 10)
    assert result.status_counts() == {"call": {"404": missing, TRANSPORT: drops}}
    assert result.errors() == drops + missing
    assert result.errors(intended=[404]) == drops
    assert result.ops == 0 and result.failed_ops == drops + missing
    assert len(unanswered) == drops  # the operation learns that its call got no answer


async def test_chunked_bodies_and_connection_close(tiny: TinyServer) -> None:
    bodies: Counter[bytes] = Counter()

    def op(seq: int) -> Op:
        response = yield Call("get", "GET", "/chunked" if seq % 2 else "/close")
        bodies[response.body] += 1

    # open loop: exactly operations 0..19, half of each kind, whatever the machine's speed
    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.2, rate=100)

    chunked, closed = tiny.requests["GET /chunked"], tiny.requests["GET /close"]
    assert (chunked, closed) == (10, 10)
    assert bodies == Counter({b"abcdefg": chunked, b"bye": closed})
    assert result.status_counts() == {"get": {"200": chunked + closed}}
    assert result.errors() == 0
    assert tiny.connections >= closed  # a new connection after every `Connection: close`


async def test_a_failing_operation_is_counted_and_the_run_goes_on(tiny: TinyServer) -> None:
    def op(seq: int) -> Op:
        response = yield Call("ok", "GET", "/ok")
        if seq % 2:
            json.loads(response.body)  # "ok" is not JSON: the operation's own bug

    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.2, rate=100)

    counts = result.status_counts()["ok"]
    assert counts["200"] == tiny.requests["GET /ok"] == 20  # operations 0..19 all ran
    assert counts[OP_ERROR] == result.failed_ops == 10  # the odd ones failed, and the run went on


def test_parse_response_waits_for_a_whole_response_and_leaves_the_next_one() -> None:
    whole = b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello"
    buffer = bytearray(whole[:-1])
    assert parse_response(buffer) is None
    buffer += whole[-1:] + b"HTTP/1.1 204 No Content\r\n\r\n"
    assert parse_response(buffer) == (Response(201, b"hello"), True)
    assert parse_response(buffer) == (Response(204, b""), True)
    assert buffer == b""


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    values = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    assert percentile_ms(values, 50) == 50.0
    assert percentile_ms(values, 99) == 99.0
    assert percentile_ms(values, 100) == 100.0
    assert percentile_ms([], 99) is None


async def test_the_window_starts_after_the_collection_before_the_run(
    tiny: TinyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full collection on the way into a run can outlast a short run (the whole suite's heap made it
    take longer than 0.2 s once); the window is counted from after it, so the run still runs whole."""
    from billing.bench import loadgen

    slow = loadgen.no_full_collections

    @contextmanager
    def slow_collection() -> Iterator[None]:
        time.sleep(0.3)  # stands for a collection of a large heap: the event loop is blocked meanwhile
        with slow():
            yield

    monkeypatch.setattr(loadgen, "no_full_collections", slow_collection)

    def op(seq: int) -> Op:
        yield Call("ok", "GET", "/ok" if seq % 2 else "/thing/x")

    result = await LoadGenerator("127.0.0.1", tiny.port).run(op, connections=2, duration=0.2)

    assert tiny.requests["GET /ok"] > 0 and tiny.requests["GET /thing/x"] > 0
    assert result.ops > 0 and result.wall_s >= 0.2
