"""Accounts service: owns its transactions (one `async with db.begin()` per call, committed before the
HTTP layer answers). HTTP handlers and later workers call these same functions.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from sqlalchemy import TextClause, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.accounts import schemas as s
from billing.auth.audit import audit
from billing.auth.principal import Principal
from billing.context import Context
from billing.errors import INVALID_REQUEST, ApiError, not_found
from billing.idempotency import Outcome, run_once
from billing.ledger import entries
from billing.ledger.model import Customer, Hold, LotBalance, LotCategory
from billing.ledger.money import format_money
from billing.ledger.usage import unspendable
from billing.schemas import ListOf, internal_id, money_field, public_id, timestamp_field

# `held` counts open holds not yet expired: an expired hold stops counting at its expiry, job or not.
# `expired` is what is left of expired lots until the expiry job moves it to breakage.
# `flagged`: a chargeback that was not won puts the account up for review (SPEC §5 Disputes).
ACCOUNT_COLUMNS = (
    "a.id, a.public_id, a.external_id, a.kind, a.name, a.metadata, a.enterprise, a.created_at,"
    " b.balance, b.total_credits, b.total_usage,"
    " (SELECT coalesce(sum(h.amount), 0) FROM open_holds h"
    "   WHERE h.account_id = a.id AND h.expires_at > :now) AS held,"
    " (SELECT coalesce(sum(l.remaining), 0) FROM lots l"
    "   WHERE l.account_id = a.id AND l.live AND l.expires_at <= :now) AS expired,"
    # (through `ix_disputes_account_id_not_won`, migration 0024: every account read asks it)
    " EXISTS (SELECT 1 FROM disputes d WHERE d.account_id = a.id AND d.status <> 'won') AS flagged,"
    # Only with expired lots and open holds: the lots and holds, to tell what of the expired lots the holds
    # reserve (their captures pay from it: counted once, as held; `unspendable`).
    " (SELECT json_build_array(CAST(:now AS timestamptz),"
    "   (SELECT json_agg(json_build_array(l.id, CAST(l.remaining AS text), l.expires_at) ORDER BY l.expires_at, l.id)"
    "      FROM lots l WHERE l.account_id = a.id AND l.live),"
    "   (SELECT json_agg(json_build_array(CAST(h.amount AS text), h.created_at) ORDER BY h.created_at, h.hold_id)"
    "      FROM open_holds h WHERE h.account_id = a.id AND h.expires_at > :now))"
    "  WHERE EXISTS (SELECT 1 FROM lots l WHERE l.account_id = a.id AND l.live AND l.expires_at <= :now)"
    "    AND EXISTS (SELECT 1 FROM open_holds h WHERE h.account_id = a.id AND h.expires_at > :now)) AS reserving"
)
MAX_PAGE = 100


def new_account_id() -> str:
    return "acct_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _unspendable(row: Row[Any]) -> Decimal:
    """Expired credits not yet moved to breakage, but for what open holds reserve of them."""
    if row.reserving is None:
        return Decimal(row.expired)
    now, lots, holds = row.reserving
    return unspendable(
        [LotBalance(lot_id, Decimal(left), datetime.fromisoformat(expires)) for lot_id, left, expires in lots],
        datetime.fromisoformat(now),
        [Hold(Decimal(amount), datetime.fromisoformat(created)) for amount, created in holds],
    )


def _balance(row: Row[Any]) -> s.Balance:
    return s.Balance(
        account=row.public_id,
        balance=format_money(row.balance),
        held=format_money(row.held),
        # Expired credits not yet moved to breakage can never be spent.
        available=format_money(row.balance - _unspendable(row) - row.held),
        total_credits=format_money(row.total_credits),
        total_usage=format_money(row.total_usage),
    )


def _account(row: Row[Any]) -> s.Account:
    return s.Account(
        id=row.public_id,
        external_id=row.external_id,
        kind=row.kind,
        name=row.name,
        metadata=row.metadata,
        enterprise=row.enterprise,
        flagged_for_review=row.flagged,
        created_at=row.created_at,
        balance=_balance(row),
    )


FIND_ACCOUNT = text(
    f"SELECT {ACCOUNT_COLUMNS} FROM accounts a JOIN balances b ON b.account_id = a.id"
    " WHERE a.public_id = :p AND a.kind <> 'platform'"
)


async def find_account(conn: AsyncConnection, principal: Principal, account: str) -> Row[Any]:
    """The account, if it exists and the caller may see it; otherwise 404 (foreign accounts included)."""
    row = (await conn.execute(FIND_ACCOUNT, {"p": account, "now": clock.now()})).first()
    if row is None or not principal.may_see(row.id):
        raise not_found("account", account)
    return row


async def create_account(ctx: Context, data: s.CreateAccount) -> tuple[s.Account, bool]:
    """Create an account, idempotent on `external_id`: the same external id answers the existing account."""
    async with ctx.db.begin() as conn:
        created = await conn.scalar(
            text(
                "WITH a AS (INSERT INTO accounts (public_id, kind, type, external_id, name, metadata, enterprise)"
                " VALUES (:public_id, :kind, 'liability', :external_id, :name, CAST(:metadata AS jsonb), :enterprise)"
                " ON CONFLICT (external_id) DO NOTHING RETURNING id)"
                " INSERT INTO balances (account_id) SELECT id FROM a RETURNING account_id"
            ),
            {
                "public_id": new_account_id(),
                "kind": data.kind,
                "external_id": data.external_id,
                "name": data.name,
                "enterprise": data.enterprise,
                "metadata": msgspec.json.encode(data.metadata).decode(),
            },
        )
        row = (
            await conn.execute(
                text(
                    f"SELECT {ACCOUNT_COLUMNS} FROM accounts a JOIN balances b ON b.account_id = a.id"
                    " WHERE a.external_id = :e"
                ),
                {"e": data.external_id, "now": clock.now()},
            )
        ).one()
    if row.kind != data.kind:
        raise ApiError(
            409,
            INVALID_REQUEST,
            "external_id_conflict",
            f"external_id {data.external_id!r} already belongs to an account of kind {row.kind!r}.",
            param="external_id",
        )
    return _account(row), created is not None


async def get_account(ctx: Context, principal: Principal, account: str) -> s.Account:
    async with ctx.db.connect() as conn:
        return _account(await find_account(conn, principal, account))


async def find_by_external_id(ctx: Context, principal: Principal, external_id: str) -> s.Account:
    return await _account_named(ctx, principal, _EXTERNAL_ID, external_id)


_EXTERNAL_ID = text("SELECT public_id FROM accounts WHERE external_id = :r")


# What a customer quotes to support, and the account it leads to: the account's own id or external id, a
# purchase (its id, its Stripe PaymentIntent or Checkout Session), an API key, a generation. Each is a unique
# column with its own index; the first that names something answers.
_REFERENCE = text(
    "SELECT public_id FROM accounts WHERE kind <> 'platform' AND (public_id = :r OR external_id = :r)"
    " UNION ALL SELECT a.public_id FROM purchases p JOIN accounts a ON a.id = p.account_id"
    " WHERE p.public_id = :r OR p.payment_intent = :r OR p.checkout_session = :r"
    " UNION ALL SELECT a.public_id FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.public_id = :r"
    " UNION ALL SELECT a.public_id FROM generations g JOIN accounts a ON a.id = g.account_id WHERE g.generation_id = :r"
    " LIMIT 1"
)


async def find_by_reference(ctx: Context, principal: Principal, reference: str) -> s.Account:
    """The account a reference belongs to (`_REFERENCE`); 404 when it names nothing this caller may see."""
    return await _account_named(ctx, principal, _REFERENCE, reference)


async def _account_named(ctx: Context, principal: Principal, query: TextClause, reference: str) -> s.Account:
    """The account whose public id `query` finds for `reference` (`:r`), or 404 naming the reference."""
    async with ctx.db.connect() as conn:
        public = await conn.scalar(query, {"r": reference})
        if public is None:
            raise not_found("account", reference)
        return _account(await find_account(conn, principal, public))


# Every posting up to `as_of` (now, when not given: what had committed when the statement began), summed per ledger
# account, then per line: each platform account on its own (all of them, with or without postings), every
# customer's credits account together (a liability of the platform).
_TRIAL_BALANCE = text(
    "WITH cutoff AS (SELECT coalesce(CAST(:as_of AS timestamptz), now()) AS at),"
    " sums AS ("
    " SELECT account_id, sum(CASE WHEN amount < 0 THEN -amount ELSE 0 END) AS debits,"
    " sum(CASE WHEN amount > 0 THEN amount ELSE 0 END) AS credits"
    " FROM postings WHERE posted_at <= (SELECT at FROM cutoff) GROUP BY account_id)"
    " SELECT CASE WHEN a.kind = 'platform' THEN a.public_id ELSE 'customer_credits' END AS account,"
    " CASE WHEN a.kind = 'platform' THEN coalesce(a.name, a.public_id) ELSE 'customer credits' END AS name,"
    " a.type, count(a.id) AS accounts, coalesce(sum(s.debits), 0) AS debits,"
    " coalesce(sum(s.credits), 0) AS credits, (SELECT at FROM cutoff) AS as_of"
    " FROM accounts a LEFT JOIN sums s ON s.account_id = a.id"
    " WHERE a.kind = 'platform' OR s.account_id IS NOT NULL"
    " GROUP BY 1, 2, 3 ORDER BY min(a.id)"
)
_DEBIT_NORMAL = frozenset({"asset", "expense"})


async def trial_balance(ctx: Context, as_of: datetime | None) -> s.TrialBalance:
    """The trial balance as of `as_of` (SPEC §2, finance): debits and credits per account of the chart, customers'
    credits in one line, and whether the totals agree. Read in one statement, so one snapshot."""
    async with ctx.db.connect() as conn:
        rows = (await conn.execute(_TRIAL_BALANCE, {"as_of": as_of})).all()
    lines = [
        s.TrialBalanceLine(
            account=r.account, name=r.name, type=r.type, accounts=r.accounts, debits=format_money(r.debits),
            credits=format_money(r.credits),
            balance=format_money(r.debits - r.credits if r.type in _DEBIT_NORMAL else r.credits - r.debits),
        )
        for r in rows
    ]  # fmt: skip
    debits = sum((r.debits for r in rows), Decimal(0))
    credits = sum((r.credits for r in rows), Decimal(0))
    return s.TrialBalance(
        as_of=rows[0].as_of.astimezone(UTC), lines=lines, total_debits=format_money(debits),
        total_credits=format_money(credits), balanced=debits == credits,
    )  # fmt: skip


async def get_balance(ctx: Context, principal: Principal, account: str) -> s.Balance:
    async with ctx.db.connect() as conn:
        return _balance(await find_account(conn, principal, account))


async def balance_as_of(ctx: Context, principal: Principal, account: str, as_of: datetime) -> s.BalanceAsOf:
    """The balance right after the last posting at or before `as_of` (0 before the first), answered with
    `as_of` in UTC, as every timestamp the API answers (SPEC §7), whatever offset it was asked in."""
    async with ctx.db.connect() as conn:
        row = await find_account(conn, principal, account)
        balance = await conn.scalar(
            text(
                "SELECT balance_after FROM postings WHERE account_id = :id AND posted_at <= :t ORDER BY id DESC LIMIT 1"
            ),
            {"id": row.id, "t": as_of},
        )
    return s.BalanceAsOf(account=account, balance=format_money(balance or Decimal(0)), as_of=as_of.astimezone(UTC))


# A customer's postings, newest first, through `ix_postings_account_id_id`: a page reads about its own rows
# whatever the size of the ledger. (Grouped by entry in SQL, the planner walked every posting of every
# account back from the newest — 18 ms for a quiet account of a 170,000-posting ledger, growing with it.)
# Under the account's lock an entry's postings on it are written together, so their ids are contiguous.
_HISTORY = text(
    "SELECT id, entry_id, amount, balance_after FROM postings WHERE account_id = :id AND id < :before"
    " ORDER BY id DESC LIMIT :m"
)
_HISTORY_CURSOR = text(
    "SELECT coalesce((SELECT min(id) FROM postings WHERE entry_id = :entry AND account_id = :id),"
    " (SELECT min(id) FROM postings WHERE entry_id = :entry), 0)"
)
_HISTORY_ENTRIES = text(
    "SELECT id, kind, posted_at, description, reason FROM journal_entries WHERE id = ANY(CAST(:ids AS bigint[]))"
)


async def ledger(
    ctx: Context, principal: Principal, account: str, limit: int, starting_after: str | None
) -> ListOf[s.LedgerLine]:
    """The account's journal entries, newest first, each with the account's amount in it and the running
    balance after it (its last posting's `balance_after`)."""
    cursor = internal_id("je", starting_after, "ledger_entry") if starting_after else None
    async with ctx.db.connect() as conn:
        row = await find_account(conn, principal, account)
        before = 2**63 - 1
        if cursor is not None:
            before = await conn.scalar(_HISTORY_CURSOR, {"entry": cursor, "id": row.id})
        # (entry id, amount, balance after), newest first: enough postings for limit + 1 whole entries
        lines: list[tuple[int, Decimal, Decimal]] = []
        fetch = 2 * limit + 8
        while True:
            postings = (await conn.execute(_HISTORY, {"id": row.id, "before": before, "m": fetch})).all()
            lines = []
            for p in postings:
                if lines and lines[-1][0] == p.entry_id:
                    entry_id, amount, after = lines[-1]
                    lines[-1] = (entry_id, amount + p.amount, after)
                else:
                    lines.append((p.entry_id, p.amount, p.balance_after))
            if len(postings) < fetch:
                break  # the whole history below the cursor
            lines.pop()  # its oldest entry may continue past what was read
            if len(lines) > limit:
                break
            fetch *= 4
        lines = lines[: limit + 1]
        heads = {e.id: e for e in await conn.execute(_HISTORY_ENTRIES, {"ids": [line[0] for line in lines]})}
    return ListOf(
        data=[
            s.LedgerLine(
                id=public_id("je", entry_id),
                kind=heads[entry_id].kind,
                amount=format_money(amount),
                balance_after=format_money(after),
                posted_at=heads[entry_id].posted_at,
                description=heads[entry_id].description,
                reason=heads[entry_id].reason,
            )
            for entry_id, amount, after in lines[:limit]
        ],
        has_more=len(lines) > limit,
    )


def _lot(r: Row[Any], account: str, now: datetime) -> s.Lot:
    return s.Lot(
        id=public_id("lot", r.id),
        account=account,
        category=r.category,
        amount=format_money(r.amount),
        remaining=format_money(r.remaining),
        used=format_money(r.amount - r.remaining),
        expires_at=r.expires_at,
        expired=r.expires_at <= now,
        created_at=r.created_at,
        entry=public_id("je", r.entry_id),
    )


_LOTS = (
    "SELECT id, category, amount, remaining, expires_at, created_at, entry_id FROM lots WHERE account_id = :id"
    " AND (expires_at, id) > (CAST(:after_expiry AS timestamptz), :after_id) {live}"
    " ORDER BY expires_at, id LIMIT :n"
)
_LOT_CURSOR = text("SELECT expires_at, id FROM lots WHERE id = :lot AND account_id = :id")


async def lots(
    ctx: Context,
    principal: Principal,
    account: str,
    limit: int = MAX_PAGE,
    starting_after: str | None = None,
    *,
    live: bool = False,
) -> ListOf[s.Lot]:
    """A page of the account's lots in the order usage consumes them (soonest expiry first), after the lot
    `starting_after`; with `live`, only those with something left (an account topping up every day has
    thousands of emptied lots before them)."""
    now = clock.now()
    async with ctx.db.connect() as conn:
        row = await find_account(conn, principal, account)
        after: tuple[Any, int] = (datetime.min.replace(tzinfo=UTC), 0)
        if starting_after is not None:
            found = await conn.execute(_LOT_CURSOR, {"lot": internal_id("lot", starting_after, "lot"), "id": row.id})
            cursor = found.first()
            if cursor is None:
                raise not_found("lot", starting_after)
            after = (cursor.expires_at, cursor.id)
        rows = (
            await conn.execute(
                text(_LOTS.format(live="AND live" if live else "")),
                {"id": row.id, "after_expiry": after[0], "after_id": after[1], "n": limit + 1},
            )
        ).all()
    return ListOf(data=[_lot(r, account, now) for r in rows[:limit]], has_more=len(rows) > limit)


async def journal_entry(conn: AsyncConnection, entry_id: int) -> s.JournalEntry | None:
    head = (
        await conn.execute(
            text(
                "SELECT e.id, e.kind, a.public_id AS account, e.posted_at, e.description, e.reason, e.actor,"
                " e.reverses_entry_id FROM journal_entries e LEFT JOIN accounts a ON a.id = e.account_id"
                " WHERE e.id = :id"
            ),
            {"id": entry_id},
        )
    ).first()
    if head is None:
        return None
    postings = await conn.execute(
        text(
            "SELECT a.public_id, p.amount, p.lot_id FROM postings p JOIN accounts a ON a.id = p.account_id"
            " WHERE p.entry_id = :id ORDER BY p.id"
        ),
        {"id": entry_id},
    )
    return s.JournalEntry(
        id=public_id("je", head.id),
        kind=head.kind,
        account=head.account,
        posted_at=head.posted_at,
        description=head.description,
        reason=head.reason,
        actor=head.actor,
        reverses=public_id("je", head.reverses_entry_id) if head.reverses_entry_id else None,
        postings=[
            s.PostingOut(account=p[0], amount=format_money(p[1]), lot=public_id("lot", p[2]) if p[2] else None)
            for p in postings
        ],
    )


async def get_journal_entry(ctx: Context, entry: str) -> s.JournalEntry:
    async with ctx.db.connect() as conn:
        found = await journal_entry(conn, internal_id("je", entry, "journal_entry"))
    if found is None:
        raise not_found("journal_entry", entry)
    return found


async def move_money(
    ctx: Context,
    principal: Principal,
    account: str,
    data: s.CreateGrant | s.CreateAdjustment,
    *,
    idempotency_key: str,
    path: str,
) -> Outcome:
    """A staff grant or adjustment: one balanced entry, its lot, and an audit record, in one transaction."""
    is_grant = isinstance(data, s.CreateGrant)
    amount = money_field(data.amount, "amount", negative=None if not is_grant else "amount_must_be_positive")
    assert amount is not None
    now = clock.now()
    expires_at = timestamp_field(data.expires_at, "expires_at")
    if expires_at is None:
        expires_at = now + timedelta(days=ctx.settings.default_lot_expiry_days)

    async def work(conn: AsyncConnection) -> tuple[int, dict[str, Any]]:
        customer = Customer(row.id)
        state = await ctx.journal.lock_customer(conn, customer)
        category = LotCategory(data.category)
        if is_grant:
            entry = entries.grant(
                customer,
                amount,
                category=category,
                expires_at=expires_at,
                debt=state.debt,
                now=now,
                reason=data.reason,
                actor=principal.actor,
            )
        else:
            entry = entries.adjustment(
                customer,
                amount,
                category=category,
                expires_at=expires_at,
                lots=state.lots,
                debt=state.debt,
                now=now,
                reason=data.reason,
                actor=principal.actor,
            )
        posted = await ctx.journal.post(conn, entry, balance_before=state.balance)
        await audit(
            conn,
            principal,
            entry.kind.value,
            account_id=row.id,
            entry_id=posted.entry_id,
            reason=data.reason,
            details={"amount": format_money(amount), "category": data.category},
        )
        journal = await journal_entry(conn, posted.entry_id)
        assert journal is not None
        lot = None
        if posted.lot_id is not None:
            lot_row = (
                await conn.execute(
                    text(
                        "SELECT id, category, amount, remaining, expires_at, created_at, entry_id FROM lots"
                        " WHERE id = :id"
                    ),
                    {"id": posted.lot_id},
                )
            ).one()
            lot = _lot(lot_row, account, now)
        fresh = await find_account(conn, principal, account)
        move = s.MoneyMove(entry=journal, lot=lot, balance=_balance(fresh))
        return 201, msgspec.to_builtins(move)

    async with ctx.db.begin() as conn:
        row = await find_account(conn, principal, account)
        return await run_once(
            conn,
            scope=principal.idempotency_scope,
            key=idempotency_key,
            method="POST",
            path=path,
            canonical_body=msgspec.json.encode(data),
            work=work,
        )
