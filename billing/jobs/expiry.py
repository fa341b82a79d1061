"""Credit expiry, or breakage (SPEC §5 Expiry: unused credits expire one year after purchase, posted to
breakage, never silently).

Per account, under its balance lock: read the lots (`Journal.lock_customer`) and the open holds, let the
core build one `expiry` entry for every lot past its expiry with something left that no open hold
reserves (`entries.expiry`), post it. A hold created before its lot expired is captured from that lot, so
what it reserves stays until it is captured, released or times out (at most its timeout), and a later run
expires the rest. A lot the entry empties has nothing left, so a second run finds nothing; two concurrent
runs serialize on the balance row and the second re-reads the lots after the first committed (holds
resolve under the same lock). A dry run builds the same entries from the same lots and holds without
locking or writing anything.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import text

from billing.context import Context
from billing.db.journal import AccountMissing
from billing.ledger import entries
from billing.ledger.model import Customer, Entry, Hold, LotBalance
from billing.ledger.money import ZERO, format_money
from billing.schemas import public_id

log = logging.getLogger(__name__)

BATCH_SIZE = 500

_DUE_ACCOUNTS = text(
    """SELECT DISTINCT l.account_id, a.public_id FROM lots l JOIN accounts a ON a.id = l.account_id
WHERE l.live AND l.expires_at <= :now AND l.account_id > :after
ORDER BY l.account_id LIMIT :batch"""
)
_LOTS = text(
    "SELECT account_id, id, remaining, expires_at FROM lots WHERE account_id = ANY(:ids) AND live"
    " ORDER BY expires_at, id"
)

# Open holds reserve credits until they resolve or time out (SPEC §5 Holds); a timed-out hold reserves nothing.
_HOLDS = text(
    "SELECT account_id, amount, created_at FROM open_holds WHERE account_id = ANY(:ids) AND expires_at > :now"
)


@dataclass(frozen=True, slots=True)
class ExpiredLot:
    lot: str
    amount: Decimal
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class AccountExpiry:
    """One account's expiry entry: posted (`entry` is its id) or, in a dry run, what would be posted."""

    account: str
    lots: tuple[ExpiredLot, ...]
    entry: str | None

    @property
    def total(self) -> Decimal:
        return sum((lot.amount for lot in self.lots), ZERO)


@dataclass
class ExpiryRun:
    as_of: datetime
    dry_run: bool
    accounts: list[AccountExpiry] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((a.total for a in self.accounts), ZERO)

    @property
    def lots(self) -> int:
        return sum(len(a.lots) for a in self.accounts)


def _expired_lots(entry: Entry, lots: tuple[LotBalance, ...]) -> tuple[ExpiredLot, ...]:
    expires = {lot.id: lot.expires_at for lot in lots}
    return tuple(
        ExpiredLot(public_id("lot", p.lot), -p.amount, expires[p.lot]) for p in entry.postings if isinstance(p.lot, int)
    )


async def expire_credits(
    ctx: Context, *, now: datetime, dry_run: bool = False, batch_size: int = BATCH_SIZE
) -> ExpiryRun:
    """Move what is left of every lot expired at `now`, less what open holds reserve, to breakage, one entry
    per account; or, with `dry_run`, say what that would post and change nothing."""
    run = ExpiryRun(as_of=now, dry_run=dry_run)
    after = 0
    while True:
        async with ctx.db.connect() as conn:
            due = (await conn.execute(_DUE_ACCOUNTS, {"now": now, "after": after, "batch": batch_size})).all()
            if dry_run and due:
                lots: dict[int, list[LotBalance]] = defaultdict(list)
                holds: dict[int, list[Hold]] = defaultdict(list)
                ids = {"ids": [a for a, _ in due], "now": now}
                for account_id, *lot in await conn.execute(_LOTS, ids):
                    lots[account_id].append(LotBalance(*lot))
                for account_id, *hold in await conn.execute(_HOLDS, ids):
                    holds[account_id].append(Hold(*hold))
        for account_id, account in due:
            if dry_run:
                planned = tuple(lots[account_id])
                entry = entries.expiry(Customer(account_id), planned, now, holds[account_id])
                if entry is not None:
                    run.accounts.append(AccountExpiry(account, _expired_lots(entry, planned), None))
            else:
                done = await _expire_account(ctx, account_id, account, now)
                if done is not None:
                    run.accounts.append(done)
        if len(due) < batch_size:
            return run
        after = due[-1][0]


async def _expire_account(ctx: Context, account_id: int, account: str, now: datetime) -> AccountExpiry | None:
    async with ctx.db.begin() as conn:
        try:
            state = await ctx.journal.lock_customer(conn, Customer(account_id))
        except AccountMissing:
            return None
        held = await conn.execute(_HOLDS, {"ids": [account_id], "now": now})
        entry = entries.expiry(Customer(account_id), state.lots, now, [Hold(*hold) for _, *hold in held])
        if entry is None:  # another run got here first
            return None
        posted = await ctx.journal.post(conn, entry, balance_before=state.balance)
    done = AccountExpiry(account, _expired_lots(entry, state.lots), public_id("je", posted.entry_id))
    log.info("expired %s USD of %d lot(s) on %s (%s)", format_money(done.total), len(done.lots), account, done.entry)
    return done
