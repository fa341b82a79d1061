"""A small HTTP/1.1 load generator: asyncio, raw keep-alive connections, no HTTP library in the way.

An *operation* is a generator that yields `Call`s and is sent each call's `Response`, so one operation
can be several dependent requests (a hold, then a capture of the hold id its response named):

    def charge(seq: int) -> Op:
        response = yield Call("charge", "POST", "/v1/charges", body)
        if response.status == 201:
            acknowledged.append(generation_id)

`LoadGenerator.run` drives operations over N connections, each connection running one operation at a
time, in one of two modes:

- closed loop (`rate=None`): every connection starts its next operation as soon as the last one ends —
  the maximum throughput, and the latency at saturation;
- open loop (`rate=R`): operation i is *scheduled* at `start + i / R` whatever happens to the earlier
  ones, and its latency is measured from that scheduled time. When every connection is busy the
  operation waits for one, and that wait is part of its latency: queueing inside the load generator
  cannot hide a slow server (no coordinated omission). The event loop's timers count whole milliseconds
  (uvloop's, like libuv's), so a wake-up can come up to a millisecond or so before the scheduled time;
  an operation sent early is measured from its sending, never from the later scheduled time (that would
  take the early part off the server's latency).

Every response's status is counted (a broken connection counts as `"transport"` and aborts its
operation). Latencies are recorded per operation and per call name for operations that finish inside the
measured window (after `warmup`); throughput counts operations that succeeded (every call 2xx, or a
status the caller declared intended) in that window.

The collector's full passes are kept out of a run (`no_full_collections`): one walked the generator's
whole heap for 47 ms in the middle of an open-loop run, and every operation due meanwhile counted that
pause as the server's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import resource
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import cast

TRANSPORT = "transport"  # the connection broke or the answer was not HTTP
OP_ERROR = "op_error"  # the operation's own code raised on a response


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


Op = Generator[Call, Response, None]
OpFactory = Callable[[int], Op]


class ProtocolError(Exception):
    """The server answered something this client does not understand."""


def parse_response(buffer: bytearray) -> tuple[Response, bool] | None:
    """One complete response from the front of `buffer` (removed from it) and whether the connection
    stays open; None while incomplete. Content-Length and chunked bodies; no bodiless-until-close."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status_line = head[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x status line: {head[0][:80]!r}")
    status = int(status_line[1])
    length: int | None = None
    chunked = False
    keep_alive = status_line[0] != "HTTP/1.0"
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            value = value.strip().lower()
            keep_alive = value == "keep-alive" if status_line[0] == "HTTP/1.0" else value != "close"
    start = end + 4
    if 100 <= status < 200:  # an interim response (we never send Expect:); skip it
        del buffer[:start]
        return parse_response(buffer)
    if chunked:
        body = bytearray()
        pos = start
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buffer[pos:line_end]).split(b";", 1)[0].strip() or b"0", 16)
            pos = line_end + 2
            if size == 0:
                if buffer[pos : pos + 2] == b"\r\n":
                    pos += 2
                else:  # trailers
                    trailers_end = buffer.find(b"\r\n\r\n", pos)
                    if trailers_end < 0:
                        return None
                    pos = trailers_end + 4
                break
            if len(buffer) < pos + size + 2:
                return None
            body += buffer[pos : pos + size]
            pos += size + 2
        del buffer[:pos]
        return Response(status, bytes(body)), keep_alive
    if length is None:
        if status in (204, 304):
            length = 0
        else:
            raise ProtocolError(f"HTTP {status} without Content-Length or chunked encoding")
    if len(buffer) < start + length:
        return None
    body_bytes = bytes(buffer[start : start + length])
    del buffer[: start + length]
    return Response(status, body_bytes), keep_alive


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[Response, bool]] | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = parse_response(self.buffer)
        except (ProtocolError, ValueError) as exc:
            self.waiter = None
            waiter.set_exception(ProtocolError(str(exc)))
            return
        if parsed is not None:
            self.waiter = None
            waiter.set_result(parsed)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection closed by the server ({exc or 'EOF'})"))

    async def exchange(self, request: bytes) -> Response:
        assert self.transport is not None
        waiter: asyncio.Future[tuple[Response, bool]] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.transport.write(request)
        response, keep_alive = await waiter
        if not keep_alive:
            self.close()
        return response

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.open = False


@dataclass
class CallStats:
    latencies_ns: list[int] = field(default_factory=list)
    statuses: Counter[int | str] = field(default_factory=Counter)


@dataclass
class RunResult:
    """What one run measured. `ops` and the latencies cover the measured window only; the status counts
    cover every call of the run (warm-up and drain included), so no error goes unreported."""

    mode: str
    connections: int
    window_s: float
    ops: int
    failed_ops: int
    op_latencies_ns: list[int]
    calls: dict[str, CallStats]
    offered_rate: float | None = None
    scheduled: int = 0
    send_lag_ns: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.window_s if self.window_s > 0 else 0.0

    @property
    def cpu_pct(self) -> float:
        """The load generator's own CPU use, in % of one core."""
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def status_counts(self) -> dict[str, dict[str, int]]:
        return {name: {str(k): v for k, v in sorted(s.statuses.items(), key=str)} for name, s in self.calls.items()}

    def errors(self, intended: Iterable[int] = ()) -> int:
        """Responses that are neither 2xx nor intended, plus broken connections."""
        allowed = set(intended)
        return sum(
            n
            for s in self.calls.values()
            for status, n in s.statuses.items()
            if not (isinstance(status, int) and (200 <= status < 300 or status in allowed))
        )


@contextlib.contextmanager
def no_full_collections() -> Iterator[None]:
    """Collect once, move every object alive into the permanent generation (`gc.freeze`), and let only the
    young generations be collected until the block ends (cycles made meanwhile are still found, after)."""
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 1_000_000_000)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def wait_until(due_ns: int) -> None:
    """Sleep until about `due_ns` (`time.perf_counter_ns`): the event loop's timers may end it up to a
    millisecond or so early or late."""
    now = time.perf_counter_ns()
    if due_ns > now:
        await asyncio.sleep((due_ns - now) / 1e9)


def percentile_ms(values_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of nanosecond values, in milliseconds."""
    if not values_ns:
        return None
    ordered = sorted(values_ns)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1] / 1e6


class LoadGenerator:
    """Drives operations against one HTTP/1.1 server (`host`, `port`), plain TCP."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        fixed = {"Host": f"{host}:{port}", "User-Agent": "billing-bench", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())

    def encode(self, call: Call) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in call.headers)
        length = f"Content-Length: {len(call.body)}\r\n" if call.body or call.method not in ("GET", "HEAD") else ""
        return f"{call.method} {call.path} HTTP/1.1\r\n{self._fixed}{extra}{length}\r\n".encode("latin-1") + call.body

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        return protocol

    async def run(
        self,
        op: OpFactory,
        *,
        connections: int,
        duration: float,
        warmup: float = 0.0,
        rate: float | None = None,
        intended: Iterable[int] = (),
    ) -> RunResult:
        """Run `op(0)`, `op(1)`, ... for `warmup + duration` seconds over `connections` connections;
        closed loop, or open loop at `rate` operations per second. Operations in flight at the end are
        awaited (their calls are counted), never abandoned."""
        if connections < 1 or duration <= 0 or (rate is not None and rate <= 0):
            raise ValueError("connections ≥ 1, duration > 0 and rate > 0 (when given) are required")
        allowed = frozenset(intended)
        calls: dict[str, CallStats] = {}
        op_latencies: list[int] = []
        send_lag: list[int] = []
        ops_in_window = 0
        failed_ops = 0
        counter = itertools.count()

        async def connect_or_none() -> _Connection | None:
            try:
                return await self._connect()
            except OSError:
                return None  # counted as a transport error by the first call

        holders: list[list[_Connection | None]] = [
            [c] for c in await asyncio.gather(*(connect_or_none() for _ in range(connections)))
        ]
        interval = 1e9 / rate if rate else 0.0
        start = measure_from = end = 0  # set once the run begins, after the collection before it (below)
        scheduled = 0

        async def one_op(holder: list[_Connection | None], seq: int, origin: int, scheduled_at: int) -> bool:
            """Run operation `seq` to its end; True when every call succeeded. The first call's latency
            counts from `origin` (in open loop its scheduled time, or its sending if that came first), later
            calls' from their sending; `scheduled_at` places the operation in the window or not."""
            generator = op(seq)
            ok = True
            try:
                call = next(generator)
            except StopIteration:
                return True
            except Exception:
                calls.setdefault("op", CallStats()).statuses[OP_ERROR] += 1
                return False
            while True:
                stats = calls.get(call.name)
                if stats is None:
                    stats = calls[call.name] = CallStats()
                request = self.encode(call)
                try:
                    conn = holder[0]
                    if conn is None or not conn.open:
                        conn = holder[0] = await self._connect()
                    response = await conn.exchange(request)
                except (OSError, ProtocolError, ValueError):
                    stats.statuses[TRANSPORT] += 1
                    if holder[0] is not None:
                        holder[0].close()
                    holder[0] = None
                    generator.close()
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                    return False
                done = time.perf_counter_ns()
                stats.statuses[response.status] += 1
                # closed loop: calls that end inside the window; open loop: every call of an operation
                # scheduled inside it (however late it ends — lateness is what open loop measures)
                if (measure_from <= done <= end) if rate is None else (scheduled_at >= measure_from):
                    stats.latencies_ns.append(done - origin)
                if not (200 <= response.status < 300 or response.status in allowed):
                    ok = False
                try:
                    call = generator.send(response)
                except StopIteration:
                    return ok
                except Exception:  # a bug in the operation must not lose the whole run: count it
                    stats.statuses[OP_ERROR] += 1
                    return False
                origin = time.perf_counter_ns()

        async def closed_worker(holder: list[_Connection | None]) -> None:
            nonlocal ops_in_window, failed_ops
            while time.perf_counter_ns() < end:
                began = time.perf_counter_ns()
                ok = await one_op(holder, next(counter), began, began)
                done = time.perf_counter_ns()
                if not ok:
                    failed_ops += 1
                elif measure_from <= done <= end:
                    ops_in_window += 1
                    op_latencies.append(done - began)
            if holder[0] is not None:
                holder[0].close()

        async def open_worker(holder: list[_Connection | None]) -> None:
            nonlocal ops_in_window, failed_ops, scheduled
            while True:
                seq = next(counter)
                due = start + int(seq * interval)
                if due >= end:
                    break
                scheduled += 1
                await wait_until(due)
                began = time.perf_counter_ns()
                origin = min(due, began)  # late: the wait counts; early: from the sending, not the later due time
                ok = await one_op(holder, seq, origin, due)
                done = time.perf_counter_ns()
                if not ok:
                    failed_ops += 1
                elif due >= measure_from:
                    ops_in_window += 1
                    op_latencies.append(done - origin)  # from the due time (or the earlier sending): waiting counts
                    send_lag.append(began - due)  # < 0: the timer woke early
            if holder[0] is not None:
                holder[0].close()

        worker = closed_worker if rate is None else open_worker
        with no_full_collections():
            # The window starts here: the full collection on the way in can take longer than a short run
            # (a large heap), and a window counted from before it would be over before any operation.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu0 = usage.ru_utime + usage.ru_stime
            start = wall0 = time.perf_counter_ns()
            measure_from = start + int(warmup * 1e9)
            end = measure_from + int(duration * 1e9)
            await asyncio.gather(*(worker(holder) for holder in holders))
        wall = (time.perf_counter_ns() - wall0) / 1e9
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return RunResult(
            mode="closed" if rate is None else "open",
            connections=connections,
            window_s=duration,
            ops=ops_in_window,
            failed_ops=failed_ops,
            op_latencies_ns=op_latencies,
            calls=calls,
            offered_rate=rate,
            scheduled=scheduled,
            send_lag_ns=send_lag,
            cpu_s=usage.ru_utime + usage.ru_stime - cpu0,
            wall_s=wall,
        )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (it is not a dependency), else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return cast(asyncio.AbstractEventLoop, uvloop.new_event_loop())


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
