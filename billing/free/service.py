"""Free-model admission: may this account send one more request to a `:free` model?

Order of checks, each a distinct outcome: not a free model (400 `not_a_free_model`), no such account
(404), negative balance (402 `negative_balance`, SPEC §5 "Refusals"), quota (429
`free_model_rate_limited`). Only a request that passes all of them is counted against the quota.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import text

from billing import clock
from billing.auth.principal import Principal
from billing.context import Context
from billing.errors import LEDGER, PERMISSION, ApiError, invalid, not_found
from billing.free import schemas as s
from billing.free.quota import FreeLimiter, Usage, Verdict, day_limit, purchased_enough_sql
from billing.ledger.money import format_money

FREE_SUFFIX = ":free"
RATE_LIMIT = "rate_limit_error"

# One round trip on the hot path: the account, its balance, and whether it has purchased enough for the larger quota.
_ACCOUNT = text(
    f"SELECT a.id, b.balance, {purchased_enough_sql('a.id')} AS purchased_enough,"
    " k.id AS key_id, k.disabled, k.expires_at AS key_expires_at, k.deleted_at AS key_deleted_at"
    " FROM accounts a JOIN balances b ON b.account_id = a.id"
    " LEFT JOIN api_keys k ON k.public_id = :k AND k.account_id = a.id"
    " WHERE a.public_id = :p AND a.kind <> 'platform'"
)


class RateLimited(ApiError):
    """429 with the window that refused, its limit and reset time; `retry_after` feeds `Retry-After`."""

    def __init__(self, refused: Usage, now: datetime, degraded: bool) -> None:
        window = refused.window
        super().__init__(
            429,
            RATE_LIMIT,
            "free_model_rate_limited",
            f"Free-model requests are limited to {window.limit} per {window.name} per account;"
            f" try again after {window.reset_at:%Y-%m-%dT%H:%M:%SZ}.",
            limit_window=window.name,
            limit=window.limit,
            remaining=refused.remaining,
            reset_at=window.reset_at,
            degraded=degraded,
        )
        self.retry_after = max(math.ceil((window.reset_at - now).total_seconds()), 1)


def is_free_model(model: str) -> bool:
    return model.endswith(FREE_SUFFIX) and len(model) > len(FREE_SUFFIX)


def _window(usage: Usage) -> s.QuotaWindow:
    return s.QuotaWindow(limit=usage.window.limit, remaining=usage.remaining, reset_at=usage.window.reset_at)


def _answer(data: s.CreateFreeRequest, verdict: Verdict) -> s.FreeRequest:
    return s.FreeRequest(
        account=data.account,
        model=data.model,
        key=data.key,
        allowed=True,
        limits=s.FreeLimits(per_minute=_window(verdict.minute), per_day=_window(verdict.day)),
        degraded=verdict.degraded,
    )


async def admit(ctx: Context, limiter: FreeLimiter, principal: Principal, data: s.CreateFreeRequest) -> s.FreeRequest:
    """Admit one free-model request and count it, or refuse it (raising) without counting it."""
    if not is_free_model(data.model):
        raise invalid("not_a_free_model", f"{data.model!r} is not a free model (its id ends in `:free`).", "model")
    async with ctx.db.connect() as conn:
        row = (await conn.execute(_ACCOUNT, {"p": data.account, "k": data.key})).first()
    if row is None or not principal.may_see(row.id):
        raise not_found("account", data.account)
    now = clock.now()
    if data.key is not None:
        # A disabled, expired or deleted key may not use free models either.
        if row.key_id is None or row.key_deleted_at is not None:
            raise not_found("key", data.key)
        if row.disabled:
            raise ApiError(403, PERMISSION, "key_disabled", f"Key {data.key!r} is disabled.")
        if row.key_expires_at is not None and row.key_expires_at <= now:
            raise ApiError(403, PERMISSION, "key_expired", f"Key {data.key!r} has expired.")
    if row.balance < 0:
        raise ApiError(
            402,
            LEDGER,
            "negative_balance",
            "The account's balance is negative: pay it off before using free models.",
            balance=format_money(row.balance),
        )
    verdict = await limiter.admit(data.account, day_limit(row.purchased_enough), now)
    refused = verdict.refused_by
    if refused is not None:
        raise RateLimited(refused, now, verdict.degraded)
    return _answer(data, verdict)
