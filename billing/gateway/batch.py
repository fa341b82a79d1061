"""Group commit for one-shot charges: concurrent charges in one process share one transaction.

Each worker process keeps a queue. While a batch is in flight, new charges wait in memory (holding no
database lock); the next batch takes them all. A batch locks its accounts' balance rows in id order (so
batches in different processes never deadlock), reads every account's state in one statement, decides
each charge in arrival order with the same pure rules and SQL as a single charge — carrying balance, lots,
key counters and BYOK month usage forward in memory from one charge to the next — writes each charge's
statement, and commits once. Every charge is answered only after that commit. If the batch fails as a
whole, each of its charges is retried on its own, so one bad charge never costs the others their answer.

On the hot account this turns N lock-hold-commit cycles into one; across accounts it shares BEGIN, lock,
read and COMMIT (and the WAL flush) among the batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from billing import clock
from billing.auth.principal import Principal
from billing.context import Context
from billing.db import pipeline
from billing.errors import ApiError, from_refusal, not_found
from billing.gateway import schemas as s
from billing.gateway import service
from billing.keys.service import key_usage
from billing.ledger.model import Customer, LotBalance
from billing.ledger.money import ZERO
from billing.ledger.outcomes import Refused
from billing.ledger.usage import KeyUsage, usage_entry

MAX_BATCH = 64
# Batches in flight per process: enough to keep the database busy while Python decides the next one.
CONCURRENT_BATCHES = 2

_ITEMS = """unnest(CAST(:accounts AS text[]), CAST(:keys AS text[]), CAST(:generations AS text[]))
    WITH ORDINALITY AS x(account, key, generation, n)"""
PAYER = service.PAYER.replace(":key", "x.key").replace(":account", "x.account")
LOCK_BATCH = f"""SELECT account_id FROM balances
WHERE account_id IN (SELECT {PAYER} FROM {_ITEMS})
ORDER BY account_id FOR UPDATE"""
STATE_BATCH = f"""SELECT x.n, st.* FROM {_ITEMS}
JOIN LATERAL ({service.CHARGE_BYOK_SQL.replace(":key", "x.key").replace(":account", "x.account").replace(":generation", "x.generation")}) st
ON true ORDER BY x.n"""


@dataclass
class _Item:
    principal: Principal
    data: s.CreateCharge
    priced: service.Priced
    future: asyncio.Future[tuple[int, Any, bool]]


@dataclass(frozen=True, slots=True)
class _Written:
    row: Any
    spend: service.Spend


@dataclass
class _Live:
    """An account's state as the batch has moved it so far."""

    balance: Decimal
    lots: list[LotBalance]
    month_list_usage: Decimal
    month_requests: int
    keys: dict[int, KeyUsage] = field(default_factory=dict)


class ChargeBatcher:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.pending: list[_Item] = []
        self.running = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones

    async def charge(self, principal: Principal, data: s.CreateCharge) -> tuple[int, Any, bool]:
        if data.account is None and data.key is None:
            return await service.charge(self.ctx, principal, data)  # answers the 400
        priced = service.price(data)  # bad input is refused before it joins a batch
        future: asyncio.Future[tuple[int, Any, bool]] = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(principal, data, priced, future))
        if self.running < CONCURRENT_BATCHES:
            self.running += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                try:
                    await self._run(batch)
                except Exception:
                    await self._one_by_one([item for item in batch if not item.future.done()])
        finally:
            self.running -= 1

    async def _one_by_one(self, items: list[_Item]) -> None:
        for item in items:
            try:
                _settle(item.future, await service.charge(self.ctx, item.principal, item.data))
            except Exception as exc:
                _settle(item.future, exc)

    async def _run(self, batch: list[_Item]) -> None:
        if len(batch) == 1:
            await self._one_by_one(batch)
            return
        ctx = self.ctx
        await ctx.journal.ensure_loaded(ctx.db)
        now = clock.now()
        params = {
            "accounts": [i.data.account for i in batch],
            "keys": [i.data.key for i in batch],
            "generations": [i.data.generation_id for i in batch],
            "now": now,
            "month": now.date().replace(day=1),
        }
        # Per item (1-based): an error, a refusal written as a record, or a charge written.
        answers: dict[int, tuple[int, Any, bool] | BaseException | _Written] = {}
        later: list[_Item] = []  # replays: answered from the record once this batch has committed
        async with pipeline.transaction(ctx.db) as tx:
            _, rows = await tx.run((LOCK_BATCH, params), (STATE_BATCH, params))
            by_n = {row.n: row for row in rows}
            live: dict[int, _Live] = {}
            seen: set[str] = set()
            writes: list[tuple[str, dict[str, Any]]] = []
            for n, item in enumerate(batch, start=1):
                data = item.data
                row = by_n.get(n)
                if row is None or not item.principal.may_see(row.account_id):
                    answers[n] = not_found("account", data.account or data.key or "")
                    continue
                if data.account is not None and row.account != data.account:
                    answers[n] = not_found("key", data.key or "")
                    continue
                if row.g_id is not None or data.generation_id in seen:
                    later.append(item)
                    continue
                seen.add(data.generation_id)
                state = live.setdefault(
                    row.account_id,
                    _Live(row.balance, list(service.lots_of(row)), row.month_list_usage, row.month_requests),
                )
                if row.key_id is not None:
                    state.keys.setdefault(row.key_id, key_usage(row))
                row = _moved(row, state)
                try:
                    key = service.check_key(row, data.key, now)
                    spend = service.spend_for(row, item.priced)
                    if spend.amount > 0:
                        service.admit_on(row, spend.amount, key, now)
                except ApiError as error:
                    answers[n] = error
                    continue
                except Refused as refused:
                    refusal = from_refusal(refused)
                    riders = service.riders_for(row, data, item.priced, spend, now, has_entry=False, hold_id=None,
                                                status="refused", refusal=refusal.body())  # fmt: skip
                    statement = ctx.journal.riders_statement(riders)
                    writes.append((statement.sql, statement.params))
                    answers[n] = (refusal.status, refusal.body(), False)
                    continue
                riders = service.riders_for(
                    row, data, item.priced, spend, now, has_entry=spend.amount > 0, hold_id=None
                )
                if spend.amount > 0:
                    entry = usage_entry(
                        Customer(row.account_id), spend.amount, lots=tuple(state.lots), now=now, kind=spend.kind,
                        revenue=spend.revenue, description=f"{spend.kind.value} for generation {data.generation_id}",
                    )  # fmt: skip
                    statement = ctx.journal.entry_statement(entry, balance_before=state.balance, riders=riders)
                    assert statement.balance_after is not None
                    state.balance = statement.balance_after
                    taken = {p.lot: -p.amount for p in entry.postings if isinstance(p.lot, int)}
                    state.lots = [LotBalance(lot.id, lot.remaining - taken.get(lot.id, ZERO), lot.expires_at)
                                  for lot in state.lots]  # fmt: skip
                else:
                    statement = ctx.journal.riders_statement(riders)
                if row.key_id is not None:
                    byok = item.priced.byok_list_cost or ZERO
                    state.keys[row.key_id] = state.keys[row.key_id].plus(
                        now, ZERO if data.is_byok else spend.amount, byok
                    )
                if data.is_byok:
                    state.month_list_usage += item.priced.byok_list_cost or ZERO
                    state.month_requests += 1
                writes.append((statement.sql, statement.params))
                answers[n] = _Written(row, spend)
            results = await tx.run(*writes, commit=True)
        entry_ids = iter(results)
        for n, item in enumerate(batch, start=1):
            answer = answers.get(n)
            if answer is None:
                continue
            if isinstance(answer, BaseException):
                _settle(item.future, answer)
            elif isinstance(answer, _Written):
                written = next(entry_ids)
                entry_id = int(written[0][0]) if answer.spend.amount > 0 else None
                out = service.generation_out(answer.row, item.data, item.priced, answer.spend, now, entry_id, None)
                _settle(item.future, (201, out, False))
            else:
                next(entry_ids)
                _settle(item.future, answer)
        await self._one_by_one(later)


def _settle(future: asyncio.Future[tuple[int, Any, bool]], outcome: tuple[int, Any, bool] | BaseException) -> None:
    """Answer a waiting request. Its client may have hung up (the future was cancelled): the charge stands,
    committed or not as the batch went, and a retry with the same generation id finds it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _moved(row: Any, state: _Live) -> Any:
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
