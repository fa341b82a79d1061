"""Group commit: concurrent gateway calls in one process share one transaction. The queue and its
fallback are `Batcher`; charges are `ChargeBatcher`, here; holds and captures are in hold_batch.py.

Each worker process keeps a queue per kind and one batch of each kind in flight. While it is in flight,
new requests wait in memory (holding no database lock); the next batch takes them all. Once `BACKLOG`
requests of other payers wait, a second batch takes them beside it: enough of them to pay for a second
transaction. A batch still in flight after `LATE_AFTER_S` (a row lock held elsewhere, a stalled disk) no
longer holds the others back: the requests waiting meanwhile go ahead in another batch, unless theirs is
the payer it is stuck on.

A charge batch locks its accounts' balance rows in id order (so batches in different processes never
deadlock), reads every account's state in one statement, decides each charge in arrival order with the
same pure rules as a single charge — carrying balance, lots, key counters and BYOK month usage forward in
memory from one charge to the next — and writes the whole batch with one set-based statement (journal
entries, postings, generations, balances, lots, keys, BYOK months as JSON rows), then commits once. Every
charge is answered only after that commit. If the batch fails as a whole, each of its charges is retried
on its own, so one bad charge never costs the others their answer.

On the hot account this turns N lock-hold-commit cycles into one; across accounts it shares BEGIN, lock,
read, write and COMMIT (and the WAL flush) among the batch: four statements whatever its size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec

from billing import clock
from billing.auth.principal import Principal
from billing.context import Context
from billing.db import pipeline
from billing.db.journal import Journal
from billing.errors import ApiError, from_refusal, not_found
from billing.gateway import schemas as s
from billing.gateway import service
from billing.keys.service import key_usage
from billing.ledger.model import Customer, Entry, LotBalance
from billing.ledger.money import ZERO
from billing.ledger.outcomes import Refused
from billing.ledger.usage import KeyUsage, usage_entry

MAX_BATCH = 64
# One batch of a kind in flight per process. Measured against two on the 2-core benchmark host (alternating
# runs at the same offered rate, docs/performance.md): the second batch only split the same requests into
# smaller transactions competing for the same cores and WAL flushes. Hold + capture at 1,150 pairs/s: hold
# p99 8.8–9.3 against 14.7–16.2 ms, capture 10.1–11.8 against 17.7–19.8 ms, and a higher maximum; charges at
# 2,500/s: p99 10.3–14.8 against 13.7–18.3 ms at the same maximum.
# A second batch once this many requests of other payers wait (charges; holds and captures take none, hold_batch.py
# says why). A transaction costs PostgreSQL about as much CPU time
# as four charges whatever its size (executor start-up of the write, the trigger queue, COMMIT: ~1 ms against ~0.26 ms
# per charge; in instructions 1.67 M against 1.05 M, docs/performance.md, sessions 7 and 8), so a second one carrying
# at least four pays its way; for fewer, the requests wait for the next batch. Alternating runs of spread charges at
# 1,400/s on a host where one batch in flight had a p99 of 20–45 ms: 12.0–14.7 ms (seven runs) with 4, against
# 13.8–22.5 with 2, 16.1–17.6 with 1 (always two in flight), 10.1–24.0 with 8 and 15.6–31.2 with 16. At saturation,
# against one batch in flight: 6% more charges per second at 32 connections and 10% at 64 (three pairs each, the host
# itself moving by a third between runs).
BACKLOG = 4
# A batch in flight this long is stuck (on a lock held elsewhere, on I/O), not busy: others may go ahead,
# up to MAX_IN_FLIGHT batches of a kind.
LATE_AFTER_S = 0.05
MAX_IN_FLIGHT = 4


def json_rows(param: str, columns: dict[str, str]) -> str:
    """The JSON array parameter `param` as rows of `columns` (name → type)."""
    return f"json_to_recordset(CAST(:{param} AS json)) AS x({', '.join(f'{c} {t}' for c, t in columns.items())})"


def json_ids(param: str, column: str) -> str:
    """The bigint `column` of the JSON array parameter `param` as an array. An UPDATE ... FROM a JSON row
    set also names its targets through this: the planner guesses 100 rows for `json_to_recordset` and
    hash-joins them against a sequential scan of the whole table; an array is probed through the index."""
    return f"ARRAY(SELECT CAST(j ->> '{column}' AS bigint) FROM json_array_elements(CAST(:{param} AS json)) AS j)"


_ITEMS = json_rows("items", {"n": "int", "account": "text", "key": "text", "generation": "text"})
PAYER = service.PAYER.replace(":key", "x.key").replace(":account", "x.account")
# `= ANY(ARRAY(...))`, not `IN (SELECT ...)`: the planner hash-joins an IN against every balance row
# (a sequential scan of all accounts per batch); an array is probed through the primary key.
LOCK_BATCH = f"""SELECT account_id FROM balances
WHERE account_id = ANY(ARRAY(SELECT {PAYER} FROM {_ITEMS}))
ORDER BY account_id FOR UPDATE"""
STATE_BATCH = f"""SELECT x.n, st.* FROM {_ITEMS}
JOIN LATERAL ({service.CHARGE_BYOK_SQL.replace(":key", "x.key").replace(":account", "x.account").replace(":generation", "x.generation")}) st
ON true ORDER BY x.n"""


_GENERATION_TYPES = {
    "generation_id": "text", "account_id": "bigint", "key_id": "bigint", "member_id": "bigint", "hold_id": "bigint",
    "status": "text", "fingerprint": "text", "model": "text", "provider": "text", "total_cost": "numeric",
    "upstream_inference_cost": "numeric", "cache_discount": "numeric", "is_byok": "boolean",
    "byok_list_cost": "numeric", "byok_fee": "numeric", "byok_policy_id": "bigint", "usage": "jsonb",
    "finish_reason": "text", "cancelled": "boolean", "streamed": "boolean", "refusal": "jsonb",
    "created_at": "timestamptz",
}  # fmt: skip
_COLUMNS = ", ".join(service.GENERATION_COLUMNS)
_KEY_COUNTERS: tuple[str, ...] = KeyUsage.__slots__  # type: ignore[attr-defined]


# The whole batch in one statement, its rows as JSON arrays (one C encoder call for the batch, where
# psycopg's array dumper quoted every element through a regex: a third of the batch's Python time).
# Entry ids are drawn first, in batch order, so postings and generations name their entry by its number
# in the batch (`e`); rows go in in batch order, so an account's running balances follow posting ids.
# Per-account totals, lots and keys arrive already summed: an UPDATE ... FROM applies one source row per
# target row.
# (Whitespace collapsed: psycopg caches the parsing of queries up to 4,096 characters.)
WRITE_BATCH = " ".join(
    f"""WITH ids AS MATERIALIZED (
    SELECT n, nextval(pg_get_serial_sequence('journal_entries', 'id')) AS id
    FROM generate_series(1, json_array_length(CAST(:entries AS json))) AS n),
e AS (
    INSERT INTO journal_entries (id, kind, account_id, description, actor, reason, reverses_entry_id)
    SELECT ids.id, x.kind, x.account_id, x.description, x.actor, x.reason, x.reverses
    FROM {
        json_rows(
            "entries",
            {
                "n": "int",
                "kind": "text",
                "account_id": "bigint",
                "description": "text",
                "actor": "text",
                "reason": "text",
                "reverses": "bigint",
            },
        )
    }
    JOIN ids ON ids.n = x.n ORDER BY x.n
    RETURNING id, posted_at),
p AS (
    INSERT INTO postings (entry_id, account_id, lot_id, amount, balance_after, posted_at)
    SELECT e.id, x.account_id, x.lot_id, x.amount, x.balance_after, e.posted_at
    FROM {
        json_rows(
            "postings",
            {
                "n": "int",
                "e": "int",
                "account_id": "bigint",
                "lot_id": "bigint",
                "amount": "numeric",
                "balance_after": "numeric",
            },
        )
    }
    JOIN ids ON ids.n = x.e JOIN e ON e.id = ids.id
    ORDER BY x.n),
b AS (
    UPDATE balances SET balance = balance + x.delta, total_credits = total_credits + x.credits,
           total_usage = total_usage + x.usage, updated_at = now()
    FROM {json_rows("balances", {"account_id": "bigint", "delta": "numeric", "credits": "numeric", "usage": "numeric"})}
    WHERE balances.account_id = x.account_id AND balances.account_id = ANY({json_ids("balances", "account_id")})),
u AS (
    UPDATE lots SET remaining = remaining + x.delta
    FROM {json_rows("lots", {"id": "bigint", "delta": "numeric"})}
    WHERE lots.id = x.id AND lots.id = ANY({json_ids("lots", "id")})),
g AS (
    INSERT INTO generations (entry_id, {_COLUMNS})
    SELECT ids.id, {", ".join(f"x.{c}" for c in service.GENERATION_COLUMNS)}
    FROM {json_rows("generations", {"n": "int", "e": "int", **_GENERATION_TYPES})}
    LEFT JOIN ids ON ids.n = x.e
    ORDER BY x.n),
k AS (
    UPDATE api_keys SET {", ".join(f"{c} = x.{c}" for c in _KEY_COUNTERS)}
    FROM {
        json_rows("keys", {"id": "bigint", **{c: "date" if c.endswith("_start") else "numeric" for c in _KEY_COUNTERS}})
    }
    WHERE api_keys.id = x.id AND api_keys.id = ANY({json_ids("keys", "id")})),
bm AS (
    INSERT INTO byok_months (account_id, month, list_usage, requests, fees)
    SELECT x.account_id, CAST(:month AS date), x.list_usage, x.requests, x.fees
    FROM {json_rows("months", {"account_id": "bigint", "list_usage": "numeric", "requests": "int", "fees": "numeric"})}
    ON CONFLICT (account_id, month) DO UPDATE SET list_usage = byok_months.list_usage + EXCLUDED.list_usage,
        requests = byok_months.requests + EXCLUDED.requests, fees = byok_months.fees + EXCLUDED.fees)
SELECT id FROM ids ORDER BY n""".split()
)


class BatchWrites:
    """What a batch writes, gathered as rows for WRITE_BATCH."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.entries: list[dict[str, Any]] = []
        self.postings: list[dict[str, Any]] = []
        self.balances: dict[int, list[Decimal]] = {}  # account -> [delta, credits, usage]
        self.lots: dict[int, Decimal] = {}
        self.generations: list[dict[str, Any]] = []
        self.keys: dict[int, KeyUsage] = {}
        self.months: dict[int, list[Any]] = {}  # account -> [list usage, requests, fees]

    def entry(self, entry: Entry, balance_before: Decimal) -> tuple[int, Decimal]:
        """Add an entry on a customer; its number in the batch (1-based) and the balance after it."""
        assert entry.customer is not None and entry.new_lot is None, "a batch writes spending entries only"
        n = len(self.entries) + 1
        self.entries.append(
            {"n": n, "kind": entry.kind.value, "account_id": entry.customer.id, "description": entry.description,
             "actor": entry.actor, "reason": entry.reason, "reverses": entry.reverses}
        )  # fmt: skip
        running = balance_before
        for posting in entry.postings:
            after = None
            if isinstance(posting.account, Customer):
                running += posting.amount
                after = running
            lot = posting.lot if isinstance(posting.lot, int) else None
            if lot is not None:
                self.lots[lot] = self.lots.get(lot, ZERO) + posting.amount
            self.postings.append(
                {"n": len(self.postings) + 1, "e": n, "account_id": self.journal.account_id(posting.account),
                 "lot_id": lot, "amount": posting.amount, "balance_after": after}
            )  # fmt: skip
        totals = self.balances.setdefault(entry.customer.id, [ZERO, ZERO, ZERO])
        totals[0] += entry.balance_delta
        totals[1] += entry.credits_delta
        totals[2] += entry.usage_delta
        return n, running

    def spend(
        self,
        state: LiveAccount,
        row: Any,
        g: s.Generation,
        priced: service.Priced,
        spend: service.Spend,
        now: datetime,
        *,
        hold_id: int | None,
    ) -> int | None:
        """Add what one generation spends — its entry, its generation record, the key's counters and the
        BYOK month — and move the account's `state` past it. Its entry's number in the batch, if any."""
        entry_n = None
        if spend.amount > 0:
            entry = usage_entry(
                Customer(row.account_id), spend.amount, lots=tuple(state.lots), now=now,
                hold=service.held_by(row) if hold_id is not None else None, kind=spend.kind,
                revenue=spend.revenue, description=f"{spend.kind.value} for generation {g.generation_id}",
            )  # fmt: skip
            entry_n, state.balance = self.entry(entry, state.balance)
            taken = {p.lot: -p.amount for p in entry.postings if isinstance(p.lot, int)}
            state.lots = [LotBalance(lot.id, lot.remaining - taken.get(lot.id, ZERO), lot.expires_at)
                          for lot in state.lots]  # fmt: skip
        self.generation(entry_n, service.generation_row(row, g, priced, spend, now, hold_id=hold_id))
        byok = priced.byok_billable or ZERO
        if row.key_id is not None:
            state.keys[row.key_id] = service.key_usage_after(state.keys[row.key_id], priced, spend, now)
            self.keys[row.key_id] = state.keys[row.key_id]
        if g.is_byok:
            state.month_list_usage += byok
            state.month_requests += priced.byok_requests
            self.byok(row.account_id, byok, priced.byok_requests, spend.amount)
        return entry_n

    def generation(self, entry_n: int | None, row: dict[str, Any]) -> None:
        self.generations.append({"n": len(self.generations) + 1, "e": entry_n, **row})

    def byok(self, account_id: int, list_usage: Decimal, requests: int, fee: Decimal) -> None:
        month = self.months.setdefault(account_id, [ZERO, 0, ZERO])
        month[0] += list_usage
        month[1] += requests
        month[2] += fee

    def statement(self, month: date) -> tuple[str, dict[str, Any]]:
        encode = JSON.encode
        params: dict[str, Any] = {
            "entries": encode(self.entries).decode(),
            "postings": encode(self.postings).decode(),
            "balances": encode(
                [{"account_id": a, "delta": t[0], "credits": t[1], "usage": t[2]} for a, t in self.balances.items()]
            ).decode(),
            "lots": encode([{"id": lot, "delta": delta} for lot, delta in self.lots.items()]).decode(),
            "generations": encode(self.generations).decode(),
            "keys": encode(
                [{"id": key, **{c: getattr(usage, c) for c in _KEY_COUNTERS}} for key, usage in self.keys.items()]
            ).decode(),
            "months": encode(
                [{"account_id": a, "list_usage": m[0], "requests": m[1], "fees": m[2]} for a, m in self.months.items()]
            ).decode(),
            "month": month,
        }
        return WRITE_BATCH, params


# Decimals as JSON strings (exact: PostgreSQL reads them with numeric's own input function)
JSON = msgspec.json.Encoder(decimal_format="string")


@dataclass
class Queued:
    """A request waiting for its batch; `future` receives (status, body, replayed) or an exception."""

    principal: Principal
    future: asyncio.Future[tuple[int, Any, bool]]
    payer: str | None  # the account or key the request names (None: not known before the state read)


@dataclass
class _Item(Queued):
    data: s.CreateCharge
    priced: service.Priced


@dataclass(frozen=True, slots=True)
class _Written:
    row: Any
    spend: service.Spend
    entry_n: int | None  # its journal entry's number in the batch


@dataclass
class LiveAccount:
    """An account's state as the batch has moved it so far."""

    balance: Decimal
    lots: list[LotBalance]
    month_list_usage: Decimal
    month_requests: int
    keys: dict[int, KeyUsage] = field(default_factory=dict)


ItemT = TypeVar("ItemT", bound=Queued)


class Batcher(Generic[ItemT]):
    """Requests that arrive while a batch is in flight wait in memory (holding no database lock); the next
    batch takes them all. Subclasses decide and write a batch in one transaction (`_run`) and know how to
    serve one request on its own (`_single`): the fallback when a batch fails as a whole, so one bad
    request never costs the others their answer.

    One batch is in flight at a time, unless `backlog` requests of other payers wait (then a second takes
    them), or one has been in flight `late_after` seconds: then the requests waiting for other payers go ahead
    in another (found by the next request to arrive, or by a check every `late_after` while batches are in
    flight). The batches started that way retire once there is no backlog and none is late."""

    late_after = LATE_AFTER_S
    backlog = BACKLOG

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.pending: list[ItemT] = []
        self.running = 0  # drains (tasks taking batches one after another)
        self.busy: set[str | None] = set()  # payers of the batches in flight
        self._began: dict[object, float] = {}  # batches in flight → when (loop time)
        self._watch: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones

    def enqueue(self, item: ItemT) -> asyncio.Future[tuple[int, Any, bool]]:
        """Queue `item` for a batch; its future receives the outcome once that batch has committed."""
        self.pending.append(item)
        if (
            self.running == 0
            or (self.running == 1 and self._free(item) and self._backlog())
            or (self.running < MAX_IN_FLIGHT and self._late())
        ):
            self._start()
        return item.future

    def _start(self) -> None:
        self.running += 1
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _free(self, item: ItemT) -> bool:
        """No batch in flight has the request's payer (one not known before the state read never waits)."""
        return item.payer is None or item.payer not in self.busy

    def _backlog(self) -> bool:
        """At least `backlog` requests wait for payers that no batch in flight has. (Asked on arrival only for
        a request of such a payer: one for a payer in flight adds nothing to it, as on a hot account.)"""
        if len(self.pending) < self.backlog:
            return False
        return sum(1 for item in self.pending if self._free(item)) >= self.backlog

    def _late(self) -> bool:
        """A batch in flight began `late_after` ago or more. (Asked on every request that arrives while one
        is in flight: only the oldest is looked at, the first in `_began`, which keeps the order they began.)"""
        for began in self._began.values():
            return asyncio.get_running_loop().time() - began >= self.late_after
        return False

    def _check(self) -> None:
        """Every `late_after` while batches are in flight: when one is late and requests of other payers
        wait, another batch takes them."""
        self._watch = None
        if not self._began:
            return
        if self.running < MAX_IN_FLIGHT and self._late() and any(self._free(item) for item in self.pending):
            self._start()
        self._arm()

    def _arm(self) -> None:
        self._watch = asyncio.get_running_loop().call_later(self.late_after, self._check)

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch = self._next_batch()
                if not batch:
                    break  # all of it waits for a batch in flight; that batch's drain takes it next
                payers = {item.payer for item in batch}
                self.busy |= payers
                token = object()
                self._began[token] = asyncio.get_running_loop().time()
                if self._watch is None:
                    self._arm()
                try:
                    await self._run(batch)
                except Exception:
                    await self._one_by_one([item for item in batch if not item.future.done()])
                finally:
                    self.busy -= payers
                    del self._began[token]
                if self.running > 1 and not self._late() and not (self.running == 2 and self._backlog()):
                    break  # started beside a late batch or for a backlog: back to one in flight
        finally:
            self.running -= 1

    def _next_batch(self) -> list[ItemT]:
        """Up to MAX_BATCH waiting requests, in arrival order, leaving those whose payer a batch in flight
        already has: a second transaction on that account would only queue on its row lock, and waiting
        here instead lets the next batch take every request that came meanwhile (on a hot account this
        makes one large batch instead of two that take turns)."""
        batch: list[ItemT] = []
        rest: list[ItemT] = []
        for item in self.pending:
            if len(batch) < MAX_BATCH and self._free(item):
                batch.append(item)
            else:
                rest.append(item)
        self.pending = rest
        return batch

    async def _one_by_one(self, items: list[ItemT]) -> None:
        for item in items:
            try:
                settle(item.future, await self._single(item))
            except Exception as exc:
                settle(item.future, exc)

    async def _answer(
        self,
        batch: list[ItemT],
        answers: dict[int, Any],
        written: Callable[[ItemT, Any], tuple[int, Any, bool]],
        later: list[ItemT],
    ) -> None:
        """Once the batch has committed: answer each request (by its number in the batch) with the outcome
        decided for it — an error, a refusal, or `written(item, what)` for what the batch wrote for it —
        then the requests left for later, each on its own."""
        for n, item in enumerate(batch, start=1):
            answer = answers.get(n)
            if answer is not None:
                settle(item.future, answer if isinstance(answer, tuple | BaseException) else written(item, answer))
        await self._one_by_one(later)

    async def _single(self, item: ItemT) -> tuple[int, Any, bool]:
        raise NotImplementedError

    async def _run(self, batch: list[ItemT]) -> None:
        raise NotImplementedError


def payer_missing(row: Any, principal: Principal, account: str | None, key: str | None) -> ApiError | None:
    """404 when the payer a request names has no state row, is not the caller's to see, or is a key of
    another account than the one named."""
    if row is None or not principal.may_see(row.account_id):
        return not_found("account", account or key or "")
    if account is not None and row.account != account:
        return not_found("key", key or "")
    return None


def new_future() -> asyncio.Future[tuple[int, Any, bool]]:
    return asyncio.get_running_loop().create_future()


class ChargeBatcher(Batcher[_Item]):
    async def charge(self, principal: Principal, data: s.CreateCharge) -> tuple[int, Any, bool]:
        queued = self.queue_charge(principal, data)
        if queued is None:
            return await service.charge(self.ctx, principal, data)  # answers the 400
        return await queued

    def queue_charge(self, principal: Principal, data: s.CreateCharge) -> asyncio.Future[tuple[int, Any, bool]] | None:
        """The charge queued for a batch (bad input raises its ApiError first), or None for one that names no
        payer, which no batch takes (`charge` answers it)."""
        if data.account is None and data.key is None:
            return None
        priced = service.price(data)  # bad input is refused before it joins a batch
        return self.enqueue(_Item(principal, new_future(), data.account or data.key, data, priced))

    async def _single(self, item: _Item) -> tuple[int, Any, bool]:
        return await service.charge(self.ctx, item.principal, item.data)

    async def _run(self, batch: list[_Item]) -> None:
        ctx = self.ctx
        await ctx.journal.ensure_loaded(ctx.db)
        now = clock.now()
        items = [
            {"n": n, "account": i.data.account, "key": i.data.key, "generation": i.data.generation_id}
            for n, i in enumerate(batch, start=1)
        ]
        params = {
            "items": JSON.encode(items).decode(),
            "now": now,
            "month": now.date().replace(day=1),
        }
        # Per item (1-based): an error, a refusal written as a record, or a charge written.
        answers: dict[int, tuple[int, Any, bool] | BaseException | _Written] = {}
        later: list[_Item] = []  # replays: answered from the record once this batch has committed
        async with pipeline.transaction(ctx.db) as tx:
            _, rows = await tx.run((LOCK_BATCH, params), (STATE_BATCH, params))
            by_n = {row.n: row for row in rows}
            live: dict[int, LiveAccount] = {}
            seen: set[str] = set()
            writes = BatchWrites(ctx.journal)
            for n, item in enumerate(batch, start=1):
                data = item.data
                row: Any = by_n.get(n)
                missing = payer_missing(row, item.principal, data.account, data.key)
                if missing is not None:
                    answers[n] = missing
                    continue
                if row.g_id is not None or data.generation_id in seen:
                    later.append(item)
                    continue
                seen.add(data.generation_id)
                state, row = live_row(live, row)
                try:
                    key = service.check_key(row, data.key, now)
                    spend = service.spend_for(row, item.priced)
                    service.admit_spend(row, item.priced, spend, key, now)
                except ApiError as error:
                    answers[n] = error
                    continue
                except Refused as refused:
                    refusal = from_refusal(refused)
                    writes.generation(
                        None,
                        service.generation_row(row, data, item.priced, spend, now, hold_id=None, status="refused",
                                               refusal=refusal.body()),
                    )  # fmt: skip
                    answers[n] = (refusal.status, refusal.body(), False)
                    continue
                entry_n = writes.spend(state, row, data, item.priced, spend, now, hold_id=None)
                answers[n] = _Written(row, spend, entry_n)
            (entry_ids,) = await tx.run(writes.statement(now.date().replace(day=1)), commit=True)

        def charged(item: _Item, done: _Written) -> tuple[int, Any, bool]:
            entry_id = entry_ids[done.entry_n - 1].id if done.entry_n else None
            return 201, service.generation_out(done.row, item.data, item.priced, done.spend, now, entry_id, None), False

        await self._answer(batch, answers, charged, later)


def settle(future: asyncio.Future[tuple[int, Any, bool]], outcome: tuple[int, Any, bool] | BaseException) -> None:
    """Answer a waiting request. Its client may have hung up (the future was cancelled): the charge stands,
    committed or not as the batch went, and a retry with the same generation id finds it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def live_row(live: dict[int, LiveAccount], row: Any) -> tuple[LiveAccount, Any]:
    """The state of `row`'s account as the batch has moved it so far (as read, the first time), and the
    row moved to it."""
    state = live.get(row.account_id)
    if state is None:
        state = live[row.account_id] = LiveAccount(
            row.balance, list(service.lots_of(row)), row.month_list_usage, row.month_requests
        )
    if row.key_id is not None:
        state.keys.setdefault(row.key_id, key_usage(row))
    return state, moved(row, state)


def moved(row: Any, state: LiveAccount) -> Any:
    """The state row as of this point in the batch."""
    key = state.keys.get(row.key_id) if row.key_id is not None else None
    changes: dict[str, Any] = {
        "balance": state.balance,
        "lot_ids": [lot.id for lot in state.lots],
        "lot_remaining": [lot.remaining for lot in state.lots],
        "lot_expires": [lot.expires_at for lot in state.lots],
        "month_list_usage": state.month_list_usage,
        "month_requests": state.month_requests,
    }
    if key is not None:
        changes.update({name: getattr(key, name) for name in KeyUsage.__slots__})  # type: ignore[attr-defined]
    return row._replace(**changes)
