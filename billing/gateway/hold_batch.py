"""Group commit for holds and captures, as for charges (billing/gateway/batch.py): concurrent requests in
one process share one transaction, which locks their accounts' balance rows in id order, reads every
state in one statement, decides each request in arrival order and writes them all with set-based
statements, then commits once. Each request is answered after that commit; replays are answered from
the record afterwards; a batch that fails as a whole is retried request by request. Unlike charges, a
backlog of waiting requests starts no second batch of a kind; only a late batch does (`NO_BACKLOG`).

- Holds: each account's and each key's held amount is carried forward in memory, so a later hold in the
  batch is admitted against the earlier ones.
- Captures: what each spends goes through the same `BatchWrites` as a charge (entry, generation, key
  counters, BYOK month, carried forward per account); the holds are marked captured in the same commit.
  A capture naming a generation id already recorded for something else is answered 409 on its own,
  writing nothing; the batch's other captures go ahead. Releases stay one transaction each.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from billing import clock
from billing.auth.principal import Principal
from billing.db import pipeline
from billing.errors import ApiError, from_refusal, not_found
from billing.gateway import schemas as s
from billing.gateway import service
from billing.gateway.batch import (
    JSON,
    PAYER,
    Batcher,
    BatchWrites,
    LiveAccount,
    Queued,
    json_ids,
    json_rows,
    live_row,
    new_future,
    payer_missing,
)
from billing.ledger.money import ZERO
from billing.ledger.outcomes import Refused
from billing.schemas import internal_id

# No second batch for a backlog (only beside a late one, as for every batcher): a hold batch and a capture
# batch in flight are already two transactions beside each other, and backlog batches of each made up to four
# on two cores. Alternating runs of hold + capture at 450 pairs/s, on a host where pgbench's own p99 at half
# its maximum was 17 ms (five pairs, two 12 s windows each, backlog batches off against on): hold p50
# 7.5–11.0 ms against 9.6–15.7, capture p50 10.1–15.0 against 13.4–21.1, PostgreSQL at 68–75% of a core
# against 80–85%, the windows' median p99 27 / 34 ms against 30 / 39, and the maximum no lower
# (docs/performance.md, session 11). Charges keep theirs: one kind alone has one batch in flight.
NO_BACKLOG = sys.maxsize

_ITEMS = json_rows("items", {"n": "int", "account": "text", "key": "text", "request_id": "text"})
LOCK_HOLDS = f"""SELECT account_id FROM balances
WHERE account_id = ANY(ARRAY(SELECT {PAYER} FROM {_ITEMS}))
ORDER BY account_id FOR UPDATE"""
_STATE = (
    service.HOLD_SQL.replace(":key", "x.key").replace(":account", "x.account").replace(":request_id", "x.request_id")
)
STATE_HOLDS = f"SELECT x.n, st.* FROM {_ITEMS} JOIN LATERAL ({_STATE}) st ON true ORDER BY x.n"
INSERT_HOLDS = f"""INSERT INTO holds (account_id, key_id, request_id, amount, status, fingerprint, created_at,
    expires_at, resolution)
SELECT x.account_id, x.key_id, x.request_id, x.amount, x.status, x.fingerprint, x.created_at, x.expires_at,
    x.resolution
FROM {json_rows("holds", {"n": "int", "account_id": "bigint", "key_id": "bigint", "request_id": "text",
                      "amount": "numeric", "status": "text", "fingerprint": "text", "created_at": "timestamptz",
                      "expires_at": "timestamptz", "resolution": "jsonb"})}
ORDER BY x.n
RETURNING id, account_id, request_id"""  # fmt: skip


@dataclass
class _Hold(Queued):
    data: s.CreateHold
    amount: Decimal


@dataclass(frozen=True, slots=True)
class _Opened:
    row: Any  # the account's state row


class HoldBatcher(Batcher[_Hold]):
    backlog = NO_BACKLOG

    async def hold(self, principal: Principal, data: s.CreateHold) -> tuple[int, Any, bool]:
        return await self.queue_hold(principal, data)

    def queue_hold(self, principal: Principal, data: s.CreateHold) -> asyncio.Future[tuple[int, Any, bool]]:
        amount = service.hold_amount(data)  # bad input is refused before it joins a batch
        return self.enqueue(_Hold(principal, new_future(), data.account or data.key, data, amount))

    async def _single(self, item: _Hold) -> tuple[int, Any, bool]:
        return await service.create_hold(self.ctx, item.principal, item.data)

    async def _run(self, batch: list[_Hold]) -> None:
        now = clock.now()
        items = [
            {"n": n, "account": i.data.account, "key": i.data.key, "request_id": i.data.request_id}
            for n, i in enumerate(batch, start=1)
        ]
        params = {"items": JSON.encode(items).decode(), "now": now}
        answers: dict[int, tuple[int, Any, bool] | BaseException | _Opened] = {}
        later: list[_Hold] = []  # replays: answered from the record once this batch has committed
        async with pipeline.transaction(self.ctx.db) as tx:
            _, rows = await tx.run((LOCK_HOLDS, params), (STATE_HOLDS, params))
            by_n = {row.n: row for row in rows}
            held: dict[int, Decimal] = {}  # account -> open holds, this batch's included
            key_held: dict[int, Decimal] = {}  # key -> the same, per key
            seen: set[tuple[int, str]] = set()
            inserts: list[dict[str, Any]] = []
            for n, item in enumerate(batch, start=1):
                data = item.data
                row: Any = by_n.get(n)
                missing = payer_missing(row, item.principal, data.account, data.key)
                if missing is not None:
                    answers[n] = missing
                    continue
                if row.hx_id is not None or (row.account_id, data.request_id) in seen:
                    later.append(item)
                    continue
                seen.add((row.account_id, data.request_id))
                account_held = held.setdefault(row.account_id, row.held)
                this_key_held = key_held.setdefault(row.key_id, row.key_held or ZERO) if row.key_id else None
                row = row._replace(held=account_held, key_held=this_key_held)
                refusal: ApiError | None = None
                try:
                    key = service.check_key(row, data.key, now)
                    service.admit_on(row, item.amount, key, now)
                except ApiError as error:
                    answers[n] = error
                    continue
                except Refused as refused:
                    refusal = from_refusal(refused)
                if refusal is None:
                    held[row.account_id] += item.amount
                    if row.key_id is not None:
                        key_held[row.key_id] += item.amount
                inserts.append(
                    {"n": n, "account_id": row.account_id, "key_id": row.key_id, "request_id": data.request_id,
                     "amount": item.amount, "status": "refused" if refusal else "open",
                     "fingerprint": service.fingerprint(data), "created_at": now,
                     "expires_at": now + timedelta(seconds=data.timeout_seconds),
                     "resolution": refusal.body() if refusal else None}
                )  # fmt: skip
                answers[n] = (refusal.status, refusal.body(), False) if refusal else _Opened(row)
            (inserted,) = await tx.run((INSERT_HOLDS, {"holds": JSON.encode(inserts).decode()}), commit=True)
        ids = {(r.account_id, r.request_id): r.id for r in inserted}

        def opened(item: _Hold, done: _Opened) -> tuple[int, Any, bool]:
            hold_id = ids[(done.row.account_id, item.data.request_id)]
            return 201, service.hold_out(hold_id, item.data, item.amount, now, done.row), False

        await self._answer(batch, answers, opened, later)


_CAPTURES = json_rows("items", {"n": "int", "hold": "bigint", "generation": "text"})
LOCK_CAPTURES = f"""SELECT account_id FROM balances
WHERE account_id = ANY(ARRAY(SELECT (SELECT account_id FROM holds WHERE id = x.hold) FROM {_CAPTURES}))
ORDER BY account_id FOR UPDATE"""
STATE_CAPTURES = (
    f"SELECT x.n, st.* FROM {_CAPTURES} JOIN LATERAL"
    f" ({service.RESOLVE_BYOK_SQL.replace(':hold', 'x.hold').replace(':generation', 'x.generation')}) st"
    " ON true ORDER BY x.n"
)
# Only holds still open are captured (the batch read them open, under their account's lock).
CAPTURE_HOLDS = f"""UPDATE holds SET status = 'captured', resolved_at = now(), resolution = x.resolution
FROM {json_rows("resolutions", {"id": "bigint", "resolution": "jsonb"})}
WHERE holds.id = x.id AND holds.id = ANY({json_ids("resolutions", "id")}) AND holds.status = 'open'"""


@dataclass
class _Capture(Queued):
    hold: str  # as the caller named it
    hold_id: int
    data: s.Capture
    priced: service.Priced


@dataclass(frozen=True, slots=True)
class _Captured:
    row: Any
    spend: service.Spend
    entry_n: int | None


class CaptureBatcher(Batcher[_Capture]):
    backlog = NO_BACKLOG

    async def capture(self, principal: Principal, hold: str, data: s.Capture) -> tuple[int, Any, bool]:
        return await self.queue_capture(principal, hold, data)

    def queue_capture(self, principal: Principal, hold: str, data: s.Capture) -> asyncio.Future[tuple[int, Any, bool]]:
        hold_id = internal_id("hold", hold, "hold")
        priced = service.price(data)  # bad input is refused before it joins a batch
        return self.enqueue(_Capture(principal, new_future(), None, hold, hold_id, data, priced))

    async def _single(self, item: _Capture) -> tuple[int, Any, bool]:
        return await service.resolve_hold(self.ctx, item.principal, item.hold, item.data)

    async def _run(self, batch: list[_Capture]) -> None:
        ctx = self.ctx
        await ctx.journal.ensure_loaded(ctx.db)
        now = clock.now()
        month = now.date().replace(day=1)
        items = [{"n": n, "hold": i.hold_id, "generation": i.data.generation_id} for n, i in enumerate(batch, start=1)]
        params = {"items": JSON.encode(items).decode(), "now": now, "month": month}
        answers: dict[int, tuple[int, Any, bool] | BaseException | _Captured] = {}
        later: list[_Capture] = []  # resolved already, or twice in this batch: answered on their own afterwards
        async with pipeline.transaction(ctx.db) as tx:
            _, rows = await tx.run((LOCK_CAPTURES, params), (STATE_CAPTURES, params))
            by_n = {row.n: row for row in rows}
            live: dict[int, LiveAccount] = {}
            holds: set[int] = set()
            generations: set[str] = set()
            writes = BatchWrites(ctx.journal)
            resolutions: list[dict[str, Any]] = []
            for n, item in enumerate(batch, start=1):
                data = item.data
                row: Any = by_n.get(n)
                if (
                    row is None
                    or not item.principal.may_see(row.account_id)
                    or (data.account is not None and data.account != row.account)
                    or row.hx_status == "refused"
                ):
                    answers[n] = not_found("hold", item.hold)
                    continue
                if service.expired(row, now):
                    answers[n] = service.hold_expired(item.hold, row)
                    continue
                if row.hx_status != "open" or row.hx_id in holds or data.generation_id in generations:
                    later.append(item)
                    continue
                reused = service.generation_reused(row, data.generation_id)
                if reused is not None:
                    answers[n] = reused
                    continue
                holds.add(row.hx_id)
                generations.add(data.generation_id)
                state, row = live_row(live, row)
                spend = service.spend_for(row, item.priced)  # captured even beyond the hold or the balance
                entry_n = writes.spend(state, row, data, item.priced, spend, now, hold_id=row.hx_id)
                fp = service.fingerprint(data)
                resolutions.append({"id": row.hx_id, "resolution": service.resolution(fp, data.generation_id)})
                answers[n] = _Captured(row, spend, entry_n)
            write_sql, write_params = writes.statement(month)
            (entry_ids, _) = await tx.run(
                (write_sql, write_params),
                (CAPTURE_HOLDS, {"resolutions": JSON.encode(resolutions).decode()}),
                commit=True,
            )

        def captured(item: _Capture, done: _Captured) -> tuple[int, Any, bool]:
            entry_id = entry_ids[done.entry_n - 1].id if done.entry_n else None
            generation = service.generation_out(
                done.row, item.data, item.priced, done.spend, now, entry_id, done.row.hx_id
            )
            return 200, s.CaptureOut(hold=service.resolved_view(done.row, "captured"), generation=generation), False

        await self._answer(batch, answers, captured, later)
