"""The hot path. Each call is one transaction and two network round trips on a pipelined connection:
(1) BEGIN, lock the account's balance row, read everything the rules need (balance, open holds, live lots,
the key, the idempotency record); (2) write everything the outcome needs (entry, postings, lots, totals,
key counters, generation, hold) in one statement, and COMMIT. Rules are decided in Python, between the
two, by the pure functions of billing/ledger/usage.py. Concurrent charges, holds and captures are grouped
into one transaction per batch by billing/gateway/batch.py and hold_batch.py, which reuse these same
rules and records; the functions here serve a request on its own (batching off, a replay, or the retry of
a batch that failed as a whole) and releases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from psycopg.errors import UniqueViolation
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.auth.principal import Principal
from billing.context import Context
from billing.db import pipeline
from billing.db.journal import Rider
from billing.db.pipeline import Pipe
from billing.errors import (
    IDEMPOTENCY,
    INVALID_REQUEST,
    PERMISSION,
    ApiError,
    from_refusal,
    invalid,
    not_found,
)
from billing.gateway import schemas as s
from billing.keys.service import key_limit, key_usage
from billing.ledger.model import Customer, EntryKind, Hold, LotBalance, Platform
from billing.ledger.money import ZERO, format_money
from billing.ledger.outcomes import Refused
from billing.ledger.usage import (
    MAX_REQUEST_COST,
    ByokPolicy,
    KeyLimit,
    KeyUsage,
    Prices,
    TokenUsage,
    admit,
    byok_fee,
    cost_of,
    spendable,
    usage_entry,
    zero_completion,
)
from billing.schemas import internal_id, money_field, money_or_none, public_id

_KEY_COLUMNS = """k.id AS key_id, k.public_id AS key, k.member_id, m.public_id AS member, k."limit",
    k.limit_reset, k.include_byok_in_limit, k.disabled, k.expires_at AS key_expires_at,
    k.deleted_at AS key_deleted_at, k.usage_total, k.byok_total, k.day_start, k.usage_day, k.byok_day,
    k.week_start, k.usage_week, k.byok_week, k.month_start, k.usage_month, k.byok_month,
    (SELECT coalesce(sum(h.amount), 0) FROM open_holds h
      WHERE h.key_id = k.id AND h.expires_at > :now) AS key_held"""


def _state_sql(who: str, key: str, extra_columns: str = "", extra_joins: str = "") -> str:
    """Everything the rules need about the account `who`, read by the statement right after the one that
    locks its balance row (pipelined: same round trip).

    (Not in the locking statement itself: under READ COMMITTED a statement that waited for a row lock
    still reads everything but that row from the snapshot taken before the wait.)

    The open holds themselves (`open_hold_*`) are read only when a lot has expired: what they reserve of it
    is spendable by their captures (`unspendable`). Otherwise that join is skipped by a one-time filter.
    """
    return f"""
SELECT a.id AS account_id, a.public_id AS account, a.enterprise, b.balance,
    (SELECT coalesce(sum(h.amount), 0) FROM open_holds h
      WHERE h.account_id = a.id AND h.expires_at > :now) AS held,
    lt.ids AS lot_ids, lt.remaining AS lot_remaining, lt.expires AS lot_expires,
    oh.amounts AS open_hold_amounts, oh.created AS open_hold_created,
    {_KEY_COLUMNS} {extra_columns}
FROM accounts a
JOIN balances b ON b.account_id = a.id
LEFT JOIN api_keys k ON k.account_id = a.id AND {key}
LEFT JOIN accounts m ON m.id = k.member_id
LEFT JOIN LATERAL (
    SELECT array_agg(l.id ORDER BY l.expires_at, l.id) AS ids,
           array_agg(l.remaining ORDER BY l.expires_at, l.id) AS remaining,
           array_agg(l.expires_at ORDER BY l.expires_at, l.id) AS expires,
           bool_or(l.expires_at <= :now) AS any_expired
    FROM lots l WHERE l.account_id = a.id AND l.live) lt ON true
LEFT JOIN LATERAL (
    SELECT array_agg(h.amount ORDER BY h.created_at, h.hold_id) AS amounts,
           array_agg(h.created_at ORDER BY h.created_at, h.hold_id) AS created
    FROM open_holds h
    WHERE lt.any_expired AND h.account_id = a.id AND h.expires_at > :now) oh ON true
{extra_joins}
WHERE a.id = {who}"""


def _lock_sql(who: str) -> str:
    """Lock the paying account's balance row: every money move on an account serializes here."""
    return f"SELECT account_id FROM balances WHERE account_id = {who} FOR UPDATE"


PAYER = (
    "coalesce((SELECT account_id FROM api_keys WHERE public_id = :key),"
    " (SELECT id FROM accounts WHERE public_id = :account AND kind <> 'platform'))"
)
_BYOK_COLUMNS = """, pol.id AS policy_id, pol.kind AS policy_kind, pol.rate AS policy_rate,
    pol.allowance_usd, pol.enterprise_allowance_usd, pol.free_requests,
    coalesce(bm.list_usage, 0) AS month_list_usage, coalesce(bm.requests, 0) AS month_requests"""
_BYOK_JOINS = """LEFT JOIN LATERAL (SELECT * FROM byok_fee_policies WHERE effective_from <= :now
    ORDER BY effective_from DESC, id DESC LIMIT 1) pol ON true
LEFT JOIN byok_months bm ON bm.account_id = a.id AND bm.month = :month"""
_GEN_COLUMNS = ", g.id AS g_id, g.fingerprint AS g_fingerprint"
_GEN_JOINS = "LEFT JOIN generations g ON g.generation_id = :generation"

LOCK_PAYER = _lock_sql(PAYER)
CHARGE_SQL = _state_sql(PAYER, "k.public_id = :key", _GEN_COLUMNS, _GEN_JOINS)
CHARGE_BYOK_SQL = _state_sql(PAYER, "k.public_id = :key", _GEN_COLUMNS + _BYOK_COLUMNS, _GEN_JOINS + "\n" + _BYOK_JOINS)
HOLD_SQL = _state_sql(
    PAYER,
    "k.public_id = :key",
    ", hx.id AS hx_id, hx.fingerprint AS hx_fingerprint",
    "LEFT JOIN holds hx ON hx.account_id = a.id AND hx.request_id = :request_id",
)
_HOLDER = "(SELECT account_id FROM holds WHERE id = :hold)"
LOCK_HOLDER = _lock_sql(_HOLDER)
# A hold's state, and whether the capture's generation id (`:generation`; NULL for a release) is taken.
_RESOLVE_COLUMNS = (
    ", hx.id AS hx_id, hx.request_id AS hx_request_id, hx.amount AS hx_amount, hx.status AS hx_status,"
    " hx.expires_at AS hx_expires_at, hx.created_at AS hx_created_at, hx.resolution AS hx_resolution" + _GEN_COLUMNS
)
_RESOLVE_JOINS = "JOIN holds hx ON hx.id = :hold\n" + _GEN_JOINS
_HOLD_KEY = "k.id = (SELECT key_id FROM holds WHERE id = :hold)"
RESOLVE_SQL = _state_sql(_HOLDER, _HOLD_KEY, _RESOLVE_COLUMNS, _RESOLVE_JOINS)
RESOLVE_BYOK_SQL = _state_sql(_HOLDER, _HOLD_KEY, _RESOLVE_COLUMNS + _BYOK_COLUMNS, _RESOLVE_JOINS + "\n" + _BYOK_JOINS)

GENERATION_FROM = """
SELECT g.*, a.public_id AS account, k.public_id AS key, m.public_id AS member, e.id AS entry
FROM generations g JOIN accounts a ON a.id = g.account_id
LEFT JOIN api_keys k ON k.id = g.key_id LEFT JOIN accounts m ON m.id = g.member_id
LEFT JOIN journal_entries e ON e.id = g.entry_id"""
GENERATION_VIEW = text(GENERATION_FROM + "\nWHERE g.generation_id = :generation")

GENERATION_COLUMNS = (
    "generation_id", "account_id", "key_id", "member_id", "hold_id", "status", "fingerprint", "model", "provider",
    "total_cost", "upstream_inference_cost", "cache_discount", "is_byok", "byok_list_cost", "byok_fee",
    "byok_policy_id", "usage", "finish_reason", "cancelled", "streamed", "refusal", "created_at",
)  # fmt: skip
_JSONB = {"usage", "refusal"}
INSERT_GENERATION = (
    f"INSERT INTO generations (entry_id, {', '.join(GENERATION_COLUMNS)})\nVALUES ({{entry}}, "
    + ", ".join(f"CAST(:g_{c} AS jsonb)" if c in _JSONB else f":g_{c}" for c in GENERATION_COLUMNS)
    + ")"
)
UPDATE_KEY = """UPDATE api_keys SET usage_total = :k_usage_total, byok_total = :k_byok_total,
    day_start = :k_day_start, usage_day = :k_usage_day, byok_day = :k_byok_day,
    week_start = :k_week_start, usage_week = :k_usage_week, byok_week = :k_byok_week,
    month_start = :k_month_start, usage_month = :k_usage_month, byok_month = :k_byok_month
WHERE id = :k_id"""
UPSERT_BYOK_MONTH = """INSERT INTO byok_months (account_id, month, list_usage, requests, fees)
VALUES (:m_account, :m_month, :m_list, :m_requests, :m_fee)
ON CONFLICT (account_id, month) DO UPDATE SET list_usage = byok_months.list_usage + EXCLUDED.list_usage,
    requests = byok_months.requests + EXCLUDED.requests, fees = byok_months.fees + EXCLUDED.fees"""


def fingerprint(data: msgspec.Struct) -> str:
    return hashlib.sha256(msgspec.json.encode(data)).hexdigest()


def _money(raw: str | None, field: str) -> Decimal | None:
    return money_field(raw, field, maximum=MAX_REQUEST_COST)


@dataclass(frozen=True, slots=True)
class Priced:
    """A generation's money, validated: what credits pay, and what is recorded beside it."""

    cost: Decimal
    cache_discount: Decimal | None
    insured: bool
    byok_list_cost: Decimal | None
    upstream: Decimal | None
    usage: TokenUsage

    @property
    def byok_billable(self) -> Decimal | None:
        """What a BYOK generation counts at list price toward the month's allowance, its fee and the key's
        BYOK usage: nothing when zero completion insurance covers it (SPEC §5: no output, not charged for
        tokens: no fee on them either). Its reported list cost is still recorded."""
        if self.byok_list_cost is None:
            return None
        return ZERO if self.insured else self.byok_list_cost

    @property
    def byok_requests(self) -> int:
        """What a BYOK generation counts toward the month's free requests (the per-request policy): none when
        zero completion insurance covers it, as it counts nothing toward the list-price allowance either."""
        return 0 if self.insured else 1


def price(g: s.Generation) -> Priced:
    """Validate a generation's money fields (400 on anything wrong, before any lock is taken)."""
    tokens = TokenUsage(**msgspec.structs.asdict(g.usage)) if g.usage else TokenUsage()
    upstream = _money(g.upstream_inference_cost, "upstream_inference_cost")
    if g.is_byok:
        list_cost = _money(g.byok_list_cost, "byok_list_cost")
        if list_cost is None:
            raise invalid("byok_list_cost_required", "A BYOK generation gives `byok_list_cost`.", "byok_list_cost")
        if g.cost is not None and _money(g.cost, "cost") != 0:
            raise invalid("byok_cost_not_allowed", "A BYOK generation is paid upstream: send `byok_list_cost`.", "cost")
        # Insured only on the token counts it reports (like a cost given without them, one without is final).
        insured = g.usage is not None and zero_completion(tokens, g.finish_reason)
        return Priced(ZERO, None, insured, list_cost, upstream, tokens)
    if g.byok_list_cost is not None:
        raise invalid(
            "byok_list_cost_without_byok", "`byok_list_cost` is only for `is_byok` generations.", "byok_list_cost"
        )
    if g.cost is not None:
        if g.prices is not None:
            raise invalid("cost_or_prices", "Send `cost`, or `usage` with `prices`, not both.", "cost")
        # A given cost is taken as final: zero completion insurance needs the split between token cost and
        # extra services, which only `usage` + `prices` give.
        cost = _money(g.cost, "cost")
        assert cost is not None
        return Priced(cost, None, False, None, upstream, tokens)
    if g.prices is None or g.usage is None:
        raise invalid("cost_required", "Send `cost`, or `usage` with `prices`.", "cost")
    prices = Prices(
        **{name: _money(value, f"prices.{name}") or ZERO for name, value in msgspec.structs.asdict(g.prices).items()}
    )
    computed = cost_of(tokens, prices, g.finish_reason)
    if computed.total > MAX_REQUEST_COST:
        raise invalid("amount_too_large", f"The computed cost exceeds {MAX_REQUEST_COST} USD for one request.", "usage")
    return Priced(computed.total, computed.cache_discount, computed.insured, None, upstream, tokens)


def lots_of(row: Any) -> tuple[LotBalance, ...]:
    if not row.lot_ids:
        return ()
    return tuple(LotBalance(*t) for t in zip(row.lot_ids, row.lot_remaining, row.lot_expires, strict=True))


def open_holds(row: Any) -> tuple[Hold, ...]:
    """The account's open holds, as the lot rules see them: read only when one of its lots has expired."""
    if not row.open_hold_amounts:
        return ()
    return tuple(Hold(*t) for t in zip(row.open_hold_amounts, row.open_hold_created, strict=True))


def held_by(row: Any) -> Hold:
    """The hold of a RESOLVE_SQL state row, as the lot rules see it (`consume`)."""
    return Hold(row.hx_amount, row.hx_created_at)


def admit_on(row: Any, amount: Decimal, key: KeyLimit | None, now: datetime, byok: Decimal = ZERO) -> None:
    """`admit` against an account's state row: its spendable balance, open holds and the key's holds."""
    admit(
        amount,
        balance=spendable(row.balance, lots_of(row), now, open_holds(row)),
        held=row.held,
        key=key,
        key_held=row.key_held or ZERO,
        now=now,
        byok=byok,
    )


def check_key(row: Any, requested: str | None, now: datetime) -> KeyLimit | None:
    """The paying key, checked: disabled, expired or deleted keys may not spend."""
    if requested is None and row.key_id is None:
        return None
    if row.key_id is None or row.key_deleted_at is not None:
        raise not_found("key", requested or "")
    if row.disabled:
        raise ApiError(403, PERMISSION, "key_disabled", f"Key {row.key!r} is disabled.")
    if row.key_expires_at is not None and row.key_expires_at <= now:
        raise ApiError(403, PERMISSION, "key_expired", f"Key {row.key!r} expired at {row.key_expires_at.isoformat()}.")
    return key_limit(row)


def _policy(row: Any) -> ByokPolicy:
    return ByokPolicy(
        id=row.policy_id, kind=row.policy_kind, rate=row.policy_rate, allowance_usd=row.allowance_usd,
        enterprise_allowance_usd=row.enterprise_allowance_usd, free_requests=row.free_requests,
    )  # fmt: skip


async def _locked(
    tx: Pipe, principal: Principal, lock: str, sql: str, params: dict[str, Any], what: str, ident: str
) -> Any:
    """BEGIN, lock the account's balance row, read its state: one round trip."""
    locked, state = await tx.run((lock, params), (sql, params))
    if not locked or not state or not principal.may_see(state[0].account_id):
        raise not_found(what, ident)
    return state[0]


def stored_usage(t: TokenUsage, insured: bool) -> dict[str, Any]:
    """The `usage` jsonb of a generation: only the counts that are not zero, and `insured` only when true.
    Every charge writes one such row for good, so zeros are left out (readers take a missing count as 0):
    a cost-only charge's row is about half as large as with seven zero counts spelled out."""
    counts: dict[str, Any] = {name: n for name in TokenUsage.__slots__ if (n := getattr(t, name))}  # type: ignore[attr-defined]
    if insured:
        counts["insured"] = True
    return counts


@dataclass(frozen=True, slots=True)
class Spend:
    """What one generation spends, decided under the lock."""

    amount: Decimal  # credits taken: the cost, or the BYOK fee
    byok_fee: Decimal | None
    policy_id: int | None
    kind: EntryKind
    revenue: Platform


def spend_for(row: Any, priced: Priced) -> Spend:
    if priced.byok_billable is None:
        return Spend(priced.cost, None, None, EntryKind.USAGE, Platform.USAGE_REVENUE)
    policy = _policy(row)
    fee = byok_fee(
        policy,
        list_cost=priced.byok_billable,
        month_list_usage=row.month_list_usage,
        month_requests=row.month_requests,
        enterprise=row.enterprise,
    )
    return Spend(fee, fee, policy.id, EntryKind.BYOK_FEE, Platform.BYOK_FEE_REVENUE)


def admit_spend(row: Any, priced: Priced, spend: Spend, key: KeyLimit | None, now: datetime) -> None:
    """May a one-shot charge spend (the single and the batched path)? Credits must cover what it takes — its
    cost, or its BYOK fee — and the key's limit what it counts there: that, plus the BYOK list-price cost on a
    key that includes BYOK in its limit (SPEC §5 Per-key limits; `admit`). A charge that takes nothing and
    counts nothing against a limit is never refused."""
    admit_on(row, spend.amount, key, now, byok=priced.byok_billable or ZERO)


def key_usage_after(usage: KeyUsage, priced: Priced, spend: Spend, now: datetime) -> KeyUsage:
    """A key's counters after one generation (SPEC §5 Per-key limits): `usage*` counts the credits it took —
    its cost, or its BYOK fee, as a key's limit caps the credits spent through it, fees included — and
    `byok_usage*` its BYOK list-price cost (paid upstream)."""
    return usage.plus(now, spend.amount, priced.byok_billable or ZERO)


def generation_row(
    row: Any,
    g: s.Generation,
    priced: Priced,
    spend: Spend,
    now: datetime,
    *,
    hold_id: int | None,
    status: str = "charged",
    refusal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `generations` row of a charge or capture (its `entry_id` aside), keyed by column name; the
    jsonb columns (`usage`, `refusal`) as Python values."""
    return {
        "generation_id": g.generation_id,
        "account_id": row.account_id,
        "key_id": row.key_id,
        "member_id": row.member_id,
        "hold_id": hold_id,
        "status": status,
        "fingerprint": fingerprint(g),
        "model": g.model,
        "provider": g.provider,
        "total_cost": spend.amount if status == "charged" else ZERO,
        "upstream_inference_cost": priced.upstream,
        "cache_discount": priced.cache_discount,
        "is_byok": g.is_byok,
        "byok_list_cost": priced.byok_list_cost,
        "byok_fee": spend.byok_fee,
        "byok_policy_id": spend.policy_id,
        "usage": stored_usage(priced.usage, priced.insured),
        "finish_reason": g.finish_reason,
        "cancelled": g.cancelled,
        "streamed": g.streamed,
        "refusal": refusal or None,
        "created_at": now,
    }


def riders_for(
    row: Any,
    g: s.Generation,
    priced: Priced,
    spend: Spend,
    now: datetime,
    *,
    has_entry: bool,
    hold_id: int | None,
    status: str = "charged",
    refusal: dict[str, Any] | None = None,
) -> list[Rider]:
    generation = generation_row(row, g, priced, spend, now, hold_id=hold_id, status=status, refusal=refusal)
    riders = [
        Rider(
            "g",
            INSERT_GENERATION.format(entry="(SELECT id FROM e)" if has_entry else "NULL"),
            {
                f"g_{name}": msgspec.json.encode(value).decode() if name in _JSONB and value is not None else value
                for name, value in generation.items()
            },
        )
    ]
    if status != "charged":
        return riders
    if row.key_id is not None:
        counters = key_usage_after(key_usage(row), priced, spend, now)
        riders.append(
            Rider("k", UPDATE_KEY, {"k_id": row.key_id, **{f"k_{n}": getattr(counters, n) for n in counters.__slots__}})
        )  # type: ignore[attr-defined]
    if g.is_byok:
        riders.append(
            Rider(
                "bm",
                UPSERT_BYOK_MONTH,
                {
                    "m_account": row.account_id,
                    "m_month": now.date().replace(day=1),
                    "m_list": priced.byok_billable,
                    "m_requests": priced.byok_requests,
                    "m_fee": spend.amount,
                },
            )
        )
    return riders


async def generation_view(conn: AsyncConnection, generation_id: str) -> s.GenerationOut | None:
    r = (await conn.execute(GENERATION_VIEW, {"generation": generation_id})).first()
    return None if r is None else generation_of(r)


def generation_of(r: Any) -> s.GenerationOut:
    """A generation as the gateway reads it, from a row of GENERATION_FROM's columns."""
    usage = r.usage or {}
    return s.GenerationOut(
        id=r.generation_id, account=r.account, key=r.key, member=r.member,
        hold=public_id("hold", r.hold_id) if r.hold_id else None,
        total_cost=format_money(r.total_cost), usage=format_money(r.total_cost),
        upstream_inference_cost=money_or_none(r.upstream_inference_cost),
        cache_discount=money_or_none(r.cache_discount),
        is_byok=r.is_byok,
        byok_list_cost=money_or_none(r.byok_list_cost),
        byok_fee=money_or_none(r.byok_fee),
        tokens_prompt=usage.get("prompt_tokens", 0), tokens_completion=usage.get("completion_tokens", 0),
        native_tokens_reasoning=usage.get("reasoning_tokens", 0), native_tokens_cached=usage.get("cache_read_tokens", 0),
        model=r.model, provider=r.provider, finish_reason=r.finish_reason, cancelled=r.cancelled, streamed=r.streamed,
        zero_completion_insured=bool(usage.get("insured", False)), created_at=r.created_at,
        entry=public_id("je", r.entry) if r.entry else None,
    )  # fmt: skip


def _conflict(what: str, ident: str) -> ApiError:
    return ApiError(
        409, IDEMPOTENCY, "idempotency_key_reused", f"{what} {ident!r} was already used with a different request."
    )


async def _replay_generation(ctx: Context, g: s.Generation) -> tuple[int, Any]:
    async with ctx.db.connect() as conn:
        r = (
            await conn.execute(
                text("SELECT fingerprint, status, refusal FROM generations WHERE generation_id = :g"),
                {"g": g.generation_id},
            )
        ).one()
        if r.fingerprint != fingerprint(g):
            raise _conflict("generation_id", g.generation_id)
        if r.status == "refused":
            return 402, r.refusal
        return 201, await generation_view(conn, g.generation_id)


async def charge(ctx: Context, principal: Principal, data: s.CreateCharge) -> tuple[int, Any, bool]:
    """A one-shot charge, idempotent on `generation_id`. Returns (status, body, replayed)."""
    if data.account is None and data.key is None:
        raise invalid("payer_required", "Send `account` or `key`.", "account")
    priced = price(data)
    await ctx.journal.ensure_loaded(ctx.db)
    now = clock.now()
    sql = CHARGE_BYOK_SQL if data.is_byok else CHARGE_SQL
    params = {
        "account": data.account,
        "key": data.key,
        "now": now,
        "generation": data.generation_id,
        "month": now.date().replace(day=1),
    }
    try:
        async with pipeline.transaction(ctx.db) as tx:
            row = await _locked(tx, principal, LOCK_PAYER, sql, params, "account", data.account or data.key or "")
            if data.account is not None and row.account != data.account:
                raise not_found("key", data.key or "")
            if row.g_id is not None:
                raise _Replay
            key = check_key(row, data.key, now)
            spend = spend_for(row, priced)
            try:
                admit_spend(row, priced, spend, key, now)
            except Refused as refused:
                error = from_refusal(refused)
                riders = riders_for(
                    row, data, priced, spend, now, has_entry=False, hold_id=None, status="refused", refusal=error.body()
                )
                statement = ctx.journal.riders_statement(riders)
                await tx.run((statement.sql, statement.params), commit=True)
                return error.status, error.body(), False
            entry_id = await _write_spend(ctx, tx, row, data, priced, spend, now, hold_id=None)
        return 201, generation_out(row, data, priced, spend, now, entry_id, None), False
    except _Replay:
        status, body = await _replay_generation(ctx, data)
        return status, body, True
    except UniqueViolation as exc:
        if "uq_generations_generation_id" not in str(exc):
            raise
        status, body = await _replay_generation(ctx, data)
        return status, body, True


class _Replay(Exception):
    """The generation is already recorded: answer from the record, outside the transaction."""


async def _write_spend(
    ctx: Context,
    tx: Pipe,
    row: Any,
    g: s.Generation,
    priced: Priced,
    spend: Spend,
    now: datetime,
    *,
    hold_id: int | None,
    extra: list[Rider] | None = None,
) -> int | None:
    """Write the generation and what it spends, and COMMIT, in one round trip. Returns the journal entry id
    (None when nothing was spent). A capture (`row` a RESOLVE_SQL state row) pays from its hold's lots."""
    if spend.amount > 0:
        entry = usage_entry(
            Customer(row.account_id),
            spend.amount,
            lots=lots_of(row),
            now=now,
            hold=held_by(row) if hold_id is not None else None,
            kind=spend.kind,
            revenue=spend.revenue,
            description=f"{spend.kind.value} for generation {g.generation_id}",
        )
        riders = [*riders_for(row, g, priced, spend, now, has_entry=True, hold_id=hold_id), *(extra or [])]
        statement = ctx.journal.entry_statement(entry, balance_before=row.balance, riders=riders)
        (written,) = await tx.run((statement.sql, statement.params), commit=True)
        return int(written[0][0])
    riders = [*riders_for(row, g, priced, spend, now, has_entry=False, hold_id=hold_id), *(extra or [])]
    statement = ctx.journal.riders_statement(riders)
    await tx.run((statement.sql, statement.params), commit=True)
    return None


def generation_out(
    row: Any, g: s.Generation, priced: Priced, spend: Spend, now: datetime, entry_id: int | None, hold_id: int | None
) -> s.GenerationOut:
    """The record as just written (the same fields `generation_view` reads back for a replay)."""

    return s.GenerationOut(
        id=g.generation_id, account=row.account, key=row.key, member=row.member,
        hold=public_id("hold", hold_id) if hold_id else None,
        total_cost=format_money(spend.amount), usage=format_money(spend.amount),
        upstream_inference_cost=money_or_none(priced.upstream), cache_discount=money_or_none(priced.cache_discount),
        is_byok=g.is_byok, byok_list_cost=money_or_none(priced.byok_list_cost), byok_fee=money_or_none(spend.byok_fee),
        tokens_prompt=priced.usage.prompt_tokens, tokens_completion=priced.usage.completion_tokens,
        native_tokens_reasoning=priced.usage.reasoning_tokens, native_tokens_cached=priced.usage.cache_read_tokens,
        model=g.model, provider=g.provider, finish_reason=g.finish_reason, cancelled=g.cancelled, streamed=g.streamed,
        zero_completion_insured=priced.insured, created_at=now,
        entry=public_id("je", entry_id) if entry_id else None,
    )  # fmt: skip


# --- holds ---------------------------------------------------------------------------------------


def _hold_view(row: Any, account: str, key: str | None) -> s.HoldOut:
    return s.HoldOut(
        id=public_id("hold", row.id), account=account, key=key, request_id=row.request_id,
        amount=format_money(row.amount), status=row.status, expires_at=row.expires_at, created_at=row.created_at,
    )  # fmt: skip


HOLD_VIEW = """SELECT h.*, a.public_id AS account, k.public_id AS key FROM holds h
JOIN accounts a ON a.id = h.account_id LEFT JOIN api_keys k ON k.id = h.key_id"""
INSERT_HOLD = """INSERT INTO holds (account_id, key_id, request_id, amount, status, fingerprint, created_at,
    expires_at, resolution)
VALUES (:h_account, :h_key, :h_request, :h_amount, :h_status, :h_fp, :h_created, :h_expires,
    CAST(:h_resolution AS jsonb))
RETURNING id"""


def hold_amount(data: s.CreateHold) -> Decimal:
    """Validate a hold request (400 on anything wrong, before any lock is taken); the amount to hold."""
    if data.account is None and data.key is None:
        raise invalid("payer_required", "Send `account` or `key`.", "account")
    amount = _money(data.amount, "amount")
    assert amount is not None
    if amount == 0:
        raise invalid("amount_must_be_positive", "A hold must be a positive amount.", "amount")
    return amount


def hold_out(hold_id: int, data: s.CreateHold, amount: Decimal, now: datetime, row: Any) -> s.HoldOut:
    """A hold just opened, as the API shows it."""
    expires_at = now + timedelta(seconds=data.timeout_seconds)
    return _hold_view(_HoldRow(hold_id, data.request_id, amount, "open", expires_at, now), row.account, row.key)


async def create_hold(ctx: Context, principal: Principal, data: s.CreateHold) -> tuple[int, Any, bool]:
    """Reserve up to `amount` for one request, idempotent on (account, `request_id`)."""
    amount = hold_amount(data)
    now = clock.now()
    fp = fingerprint(data)
    params = {"account": data.account, "key": data.key, "now": now, "request_id": data.request_id}
    async with pipeline.transaction(ctx.db) as tx:
        row = await _locked(tx, principal, LOCK_PAYER, HOLD_SQL, params, "account", data.account or data.key or "")
        if data.account is not None and row.account != data.account:
            raise not_found("key", data.key or "")
        if row.hx_id is not None:
            (held,) = await tx.run((HOLD_VIEW + " WHERE h.id = :id", {"id": row.hx_id}))
            return _hold_outcome(held[0], fp, data.request_id, replayed=True)
        key = check_key(row, data.key, now)
        refusal: ApiError | None = None
        try:
            admit_on(row, amount, key, now)
        except Refused as refused:
            refusal = from_refusal(refused)
        hold = _HoldRow(
            0,
            data.request_id,
            amount,
            "refused" if refusal else "open",
            now + timedelta(seconds=data.timeout_seconds),
            now,
        )
        (inserted,) = await tx.run(
            (
                INSERT_HOLD,
                {
                    "h_account": row.account_id, "h_key": row.key_id, "h_request": data.request_id,
                    "h_amount": amount, "h_status": hold.status, "h_fp": fp, "h_created": now,
                    "h_expires": hold.expires_at,
                    "h_resolution": msgspec.json.encode(refusal.body()).decode() if refusal else None,
                },
            ),
            commit=True,
        )  # fmt: skip
    if refusal is not None:
        return refusal.status, refusal.body(), False
    return 201, hold_out(inserted[0][0], data, amount, now, row), False


def _hold_outcome(hold: Any, fp: str, request_id: str, *, replayed: bool) -> tuple[int, Any, bool]:
    if hold.fingerprint != fp:
        raise _conflict("request_id", request_id)
    if hold.status == "refused":
        return 402, hold.resolution, replayed
    return 201, _hold_view(hold, hold.account, hold.key), replayed


async def resolve_hold(
    ctx: Context, principal: Principal, hold: str, data: s.Capture | s.Release
) -> tuple[int, Any, bool]:
    """Capture (post the actual cost; less releases the rest, more is still charged) or release a hold.
    A hold resolves at most once; the same resolution again is replayed; an expired hold cannot resolve;
    a capture naming a generation id recorded for something else is a 409 (`generation_reused`).
    """
    hold_id = internal_id("hold", hold, "hold")
    capture = isinstance(data, s.Capture)
    priced = price(data) if isinstance(data, s.Capture) else None
    await ctx.journal.ensure_loaded(ctx.db)
    now = clock.now()
    fp = fingerprint(data)
    sql = RESOLVE_BYOK_SQL if isinstance(data, s.Capture) and data.is_byok else RESOLVE_SQL
    generation_id = data.generation_id if isinstance(data, s.Capture) else None
    params = {"hold": hold_id, "now": now, "month": now.date().replace(day=1), "generation": generation_id}
    try:
        async with pipeline.transaction(ctx.db) as tx:
            row = await _locked(tx, principal, LOCK_HOLDER, sql, params, "hold", hold)
            if data.account is not None and data.account != row.account:
                raise not_found("hold", hold)
            if row.hx_status == "refused":
                raise not_found("hold", hold)
            hold_out = resolved_view(row, "captured" if capture else "released")
            if expired(row, now):
                raise hold_expired(hold, row)
            if row.hx_status != "open":
                previous = row.hx_resolution or {}
                if previous.get("fingerprint") != fp:
                    raise ApiError(
                        409, INVALID_REQUEST, "hold_already_resolved", f"Hold {hold!r} is already {row.hx_status}."
                    )
                replay: Any = hold_out
                if previous.get("generation_id"):
                    async with ctx.db.connect() as conn:
                        generation = await generation_view(conn, previous["generation_id"])
                    replay = s.CaptureOut(hold=hold_out, generation=generation)  # type: ignore[arg-type]
                return 200, replay, True
            if isinstance(data, s.Capture):
                assert priced is not None
                if (reused := generation_reused(row, data.generation_id)) is not None:
                    raise reused
                spend = spend_for(row, priced)
                rider = resolution_rider(hold_id, "captured", fp, data.generation_id)
                entry_id = await _write_spend(ctx, tx, row, data, priced, spend, now, hold_id=hold_id, extra=[rider])
                generation = generation_out(row, data, priced, spend, now, entry_id, hold_id)
                return 200, s.CaptureOut(hold=hold_out, generation=generation), False
            statement = ctx.journal.riders_statement([resolution_rider(hold_id, "released", fp, None)])
            await tx.run((statement.sql, statement.params), commit=True)
            return 200, hold_out, False
    except UniqueViolation as exc:
        # Recorded by another account's charge or capture after this state read (on the same account it
        # would have waited for the lock and been read).
        if generation_id is None or "uq_generations_generation_id" not in str(exc):
            raise
        raise _conflict("generation_id", generation_id) from None


def generation_reused(row: Any, generation_id: str) -> ApiError | None:
    """A capture of an open hold whose generation id is already recorded — for a charge, or for another
    hold's capture — reuses an idempotency key with a different request: 409 `idempotency_key_reused`,
    nothing written (SPEC §4). (The same capture again finds its hold captured and replays first.)
    `row` is a RESOLVE_SQL state row read with the capture's generation id."""
    return _conflict("generation_id", generation_id) if row.g_id is not None else None


def resolved_view(row: Any, status: str) -> s.HoldOut:
    """The hold of a RESOLVE_SQL state row, as the API shows it once it is `status`."""
    resolved = _HoldRow(row.hx_id, row.hx_request_id, row.hx_amount, status, row.hx_expires_at, row.hx_created_at)
    return _hold_view(resolved, row.account, row.key)


def expired(row: Any, now: datetime) -> bool:
    """The hold of a RESOLVE_SQL state row can no longer resolve: expired by the job, or past its expiry."""
    return bool(row.hx_status == "expired" or (row.hx_status == "open" and row.hx_expires_at <= now))


def hold_expired(hold: str, row: Any) -> ApiError:
    return ApiError(409, INVALID_REQUEST, "hold_expired", f"Hold {hold!r} expired at {row.hx_expires_at.isoformat()}.")


def resolution(fp: str, generation_id: str | None) -> dict[str, Any]:
    """What a resolved hold keeps, so the same request replays (the generation holds the rest)."""
    return {"fingerprint": fp, "generation_id": generation_id}


@dataclass(frozen=True, slots=True)
class _HoldRow:
    id: int
    request_id: str
    amount: Decimal
    status: str
    expires_at: datetime
    created_at: datetime


def resolution_rider(hold_id: int, status: str, fp: str, generation_id: str | None) -> Rider:
    """Resolve the hold if it is still open; what is kept lets the same request replay (the generation holds
    the rest)."""
    return Rider(
        "hr",
        "UPDATE holds SET status = :hr_status, resolved_at = now(), resolution = CAST(:hr_resolution AS jsonb)"
        " WHERE id = :hr_id AND status = 'open'",
        {
            "hr_status": status,
            "hr_id": hold_id,
            "hr_resolution": msgspec.json.encode(resolution(fp, generation_id)).decode(),
        },
    )


async def get_generation(ctx: Context, principal: Principal, generation_id: str) -> s.GenerationOut:
    async with ctx.db.connect() as conn:
        out = await generation_view(conn, generation_id)
        owner = await conn.scalar(
            text("SELECT account_id FROM generations WHERE generation_id = :g AND status = 'charged'"),
            {"g": generation_id},
        )
    if out is None or owner is None or not principal.may_see(owner):
        raise not_found("generation", generation_id)
    return out
