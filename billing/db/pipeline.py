"""The hot path's transport: statements pipelined on raw psycopg connections, so BEGIN + lock + read cost
one network round trip, and write + COMMIT another.

The connections are the hot path's own (`Connections`, one set per engine, as many as the engine's pool):
opened once in autocommit mode and kept that way, taken and given back without SQLAlchemy's pool. Its
checkout and reset-on-return, with the autocommit switches around them, cost about 0.5 ms of the worker's
CPU per transaction on the benchmark machine — as much as the state read itself.

Each round trip is driven on libpq directly: every statement of it is queued in libpq's output buffer,
sent with one `send()` (one wake-up of the server process), and the answers are read back after one wait
on the socket. psycopg's own pipeline flushes and waits once per statement — a system call and an event
loop round per statement, and as many wake-ups of the server (a quarter of the worker's CPU measured under
load was that `send()` alone). psycopg still adapts the values both ways and raises its own error classes.

Statements keep SQLAlchemy's `:name` parameter style so one SQL text serves both paths. Each is prepared
on a connection the first time it runs there (planning the state reads costs milliseconds), with a
generic plan (the engine's `plan_cache_mode`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from weakref import WeakKeyDictionary

from psycopg import AsyncConnection, errors
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus
from psycopg.pq.abc import PGconn, PGresult
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.db.engine import APPLICATION_NAME, SESSION_OPTIONS
from billing.settings import libpq_url

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def compiled(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """`:name` → `$n` (a name used twice is one parameter), and the names in parameter order; `::type`
    casts are left alone."""
    order: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${order.setdefault(match[1], len(order) + 1)}"

    query = _PARAM.sub(number, sql)
    return query.encode(), tuple(order)


@functools.lru_cache(maxsize=256)
def _row_type(names: tuple[str, ...]) -> Callable[[Sequence[Any]], Any]:
    # (rename: a column with no usable name, like `?column?`, is reached by position)
    row: Any = namedtuple("Row", names, rename=True)  # type: ignore[misc]
    return row._make  # type: ignore[no-any-return]


# Statements prepared on each connection: (query, parameter types) → statement name. A name is never
# reused, so a prepare that reached the server in an exchange that failed later costs nothing.
_prepared: WeakKeyDictionary[AsyncConnection[Any], dict[tuple[bytes, tuple[int, ...]], bytes]] = WeakKeyDictionary()
_names = itertools.count(1)
_FAILED = (ExecStatus.FATAL_ERROR, ExecStatus.PIPELINE_ABORTED)
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name
BEGIN = "BEGIN"
COMMIT = "COMMIT"


class _Deallocated(Exception):
    """The prepared BEGIN that opens a transaction was gone: nothing of the exchange ran."""


class Pipe:
    """One transaction, driven by explicit BEGIN / COMMIT statements (prepared like the rest: a BEGIN
    that finds its statement gone is how a connection's lost prepared statements are noticed)."""

    def __init__(self, pg: AsyncConnection[Any]) -> None:
        self.pg = pg
        self.begun = False
        self.broken = False  # an exchange did not finish: what the connection holds is unknown
        self._adapt = Transformer(pg)
        self._prepared = _prepared.setdefault(pg, {})

    async def run(self, *statements: tuple[str, dict[str, Any]], commit: bool = False) -> list[list[Any]]:
        """Send all statements (after BEGIN, the first time; then COMMIT, if asked) in one go; the rows of
        each, as named tuples."""
        opening = not self.begun
        commands: list[tuple[str, dict[str, Any]]] = [(BEGIN, {})] * opening + list(statements)
        commands += [(COMMIT, {})] * commit
        try:
            results = await self._exchange(commands)
        except _Deallocated:
            # Something deallocated every prepared statement of this connection since its last transaction
            # (psycopg does, after a ROLLBACK it runs itself): prepare again and send the same commands.
            self._prepared.clear()
            results = await self._exchange(commands)
        self.begun = not commit
        return results[opening : opening + len(statements)]

    async def _exchange(self, commands: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
        sent: list[tuple[bytes, tuple[int, ...]] | None] = []  # per command sent: the prepare's key, or None

        def send(pgconn: PGconn) -> int:
            for sql, params in commands:
                query, names = compiled(sql)
                values = self._adapt.dump_sequence([params[n] for n in names], [PyFormat.AUTO] * len(names))
                types = tuple(self._adapt.types or ()) if names else ()
                key = (query, types)
                name = self._prepared.get(key)
                if name is None:
                    name = b"_billing_%d" % next(_names)
                    pgconn.send_prepare(name, query, param_types=types)
                    sent.append(key)
                    self._prepared[key] = name  # forgotten again below if the prepare fails
                pgconn.send_query_prepared(name, values, param_formats=self._adapt.formats if names else None)
                sent.append(None)
            return len(sent)

        results = await self._round_trip(send)
        rows: list[list[Any]] = []
        failure: PGresult | None = None
        for prepare, answers in zip(sent, results, strict=True):
            failed = next((r for r in answers if r.status in _FAILED), None)
            if failed is not None:
                if prepare is not None:
                    self._prepared.pop(prepare, None)
                if failure is None or failure.status == ExecStatus.PIPELINE_ABORTED:
                    failure = failed
            elif prepare is None:
                rows.append(self._rows(answers[-1]) if answers else [])
        if failure is not None:
            if (
                commands[0][0] == BEGIN
                and not rows
                and failure.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_STATEMENT
            ):
                raise _Deallocated
            raise errors.error_from_result(failure, encoding=self.pg.info.encoding)
        return rows

    async def rollback(self) -> None:
        """ROLLBACK, unprepared (psycopg's own rollback would deallocate every prepared statement)."""

        def send(pgconn: PGconn) -> int:
            pgconn.send_query_params(b"ROLLBACK", None)
            return 1

        (answers,) = await self._round_trip(send)
        if answers and answers[-1].status == ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(answers[-1], encoding=self.pg.info.encoding)
        self.begun = False

    async def _round_trip(self, send: Callable[[PGconn], int]) -> list[list[PGresult]]:
        """Queue commands in pipeline mode (`send` queues them and says how many), then one flush, one
        wait, and every command's results up to the sync point."""
        pgconn = self.pg.pgconn
        self.broken = True
        pgconn.enter_pipeline_mode()
        commands = send(pgconn)
        pgconn.pipeline_sync()
        await _flush(pgconn)
        results = await _collect(pgconn, commands)
        pgconn.exit_pipeline_mode()
        self.broken = False
        return results

    def _rows(self, result: PGresult) -> list[Any]:
        if result.status != ExecStatus.TUPLES_OK or not result.nfields:
            return []
        adapt = self._adapt
        adapt.set_pgresult(result)
        names = tuple(result.fname(i).decode() for i in range(result.nfields))  # type: ignore[union-attr]
        return adapt.load_rows(0, result.ntuples, _row_type(names))


async def _ready(fileno: int, *, write: bool) -> None:
    """Until the socket can be read (or, with `write`, either read or written)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fileno, wake)
    if write:
        loop.add_writer(fileno, wake)
    try:
        await future
    finally:
        loop.remove_reader(fileno)
        if write:
            loop.remove_writer(fileno)


async def _flush(pgconn: PGconn) -> None:
    """Send everything queued. While the socket cannot take more, read what the server sends meanwhile
    (libpq's rule: a server blocked on its own output would never read ours)."""
    while pgconn.flush():
        await _ready(pgconn.socket, write=True)
        pgconn.consume_input()


async def _collect(pgconn: PGconn, commands: int) -> list[list[PGresult]]:
    """The results of `commands` pipelined commands, each a list, up to the pipeline's sync point. A
    connection the server dropped raises (the server's own error when it sent one, such as an
    administrator's shutdown). Usually reading the socket raises first; the check here is the guard for
    the other way libpq can find out: a lost connection answers "no more results" to every call and the
    sync point never comes, and without the check this loop would spin the event loop forever."""
    results: list[list[PGresult]] = []
    current: list[PGresult] = []
    while True:
        while pgconn.is_busy():
            await _ready(pgconn.socket, write=False)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            if pgconn.status == ConnStatus.BAD or len(results) >= commands:
                told = next((r for rs in [*results, current] for r in rs if r.status == ExecStatus.FATAL_ERROR), None)
                if told is not None:
                    raise errors.error_from_result(told)
                raise errors.OperationalError("the connection to the server was lost")
            results.append(current)
            current = []
        elif result.status == ExecStatus.PIPELINE_SYNC:
            if len(results) != commands:
                raise errors.InternalError(f"pipeline answered {len(results)} of {commands} commands")
            return results
        else:
            current.append(result)


class Connections:
    """The hot path's connections to one database: at most `size` open, idle ones reused last-in first-out
    (the one most recently used is the one whose pages and prepared statements are warm). A connection
    comes back only when clean — no exchange left unfinished, no transaction open — and is closed
    otherwise, so a cancelled request or a lost server never hands a broken one to the next caller; a
    connection the server dropped also takes the idle ones with it."""

    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.size = size
        self.idle: list[AsyncConnection[Any]] = []
        self._slots: asyncio.Semaphore | None = None  # made in the event loop that first uses it

    async def _connect(self) -> AsyncConnection[Any]:
        return await AsyncConnection.connect(
            self.conninfo, autocommit=True, application_name=APPLICATION_NAME, options=SESSION_OPTIONS
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Pipe]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            pg = self.idle.pop() if self.idle else await self._connect()
            pipe = Pipe(pg)
            clean = False
            try:
                yield pipe
            finally:
                try:
                    if not pipe.broken and not pg.closed:
                        if pg.info.transaction_status != TransactionStatus.IDLE:
                            await pipe.rollback()
                        clean = pg.info.transaction_status == TransactionStatus.IDLE
                finally:
                    if clean:
                        self.idle.append(pg)
                    else:
                        lost = pg.pgconn.status == ConnStatus.BAD
                        await pg.close()
                        if lost:
                            # The server went away (a restart, a failover, a network cut): the idle
                            # connections are most likely gone too. Dropped now, each next caller gets a new
                            # one instead of finding a dead one first.
                            await self.close()

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for pg in idle:
            await pg.close()


_connections: WeakKeyDictionary[AsyncEngine, Connections] = WeakKeyDictionary()


def connections(engine: AsyncEngine) -> Connections:
    """The hot path's connections to `engine`'s database, as many as its pool holds."""
    found = _connections.get(engine)
    if found is None:
        size = getattr(engine.sync_engine.pool, "size", lambda: 5)()
        url = libpq_url(engine.url.render_as_string(hide_password=False))
        found = _connections[engine] = Connections(url, size)
    return found


def transaction(engine: AsyncEngine) -> AbstractAsyncContextManager[Pipe]:
    """A transaction on one of the hot path's connections to `engine`'s database; whatever is not
    committed by the end is rolled back."""
    return connections(engine).transaction()


async def dispose(engine: AsyncEngine) -> None:
    """Close the hot path's idle connections to `engine`'s database, then dispose of the engine."""
    found = _connections.pop(engine, None)
    if found is not None:
        await found.close()
    await engine.dispose()
