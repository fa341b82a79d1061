"""Free-model quotas (SPEC §5 "Free models"): 20 requests per minute, and 50 per day — 1,000 per day once
the account has purchased at least $10 of credits in total. Account-wide (extra keys add no quota);
windows are UTC calendar windows: the minute, and the day that resets at 00:00 UTC.

Counting lives in Redis: one Lua script checks both windows and counts the request in both only if
both have room, atomically, so a refused request consumes nothing and concurrent requests can never
overshoot. Fixed windows (not sliding) because the spec's day resets at a fixed instant, and then the
minute behaves the same way and every answer can name an exact reset time; the price is that a client
can fit up to 2 × 20 requests into the 60 seconds around a minute boundary.

When Redis is unreachable the limiter fails open to a per-process counter with the same limits and
marks its verdicts `degraded` (documented in docs/free-models.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("billing.free")

PER_MINUTE = 20
PER_DAY = 50
PER_DAY_AFTER_PURCHASE = 1_000
PURCHASE_THRESHOLD = Decimal("10")  # USD of credits purchased in total, ever

# Keep counters a while past their window, so processes whose clocks differ slightly agree on them.
_GRACE = {"minute": timedelta(minutes=1), "day": timedelta(hours=1)}
# After a Redis failure, go straight to the fallback for this long instead of waiting on Redis again.
RETRY_REDIS_AFTER_SECONDS = 1.0

WindowName = Literal["minute", "day"]

# KEYS: the minute counter, the day counter. ARGV: minute limit, day limit, minute TTL, day TTL (s).
# Returns {admitted (0/1), minute count, day count}, counts including this request when admitted.
ADMIT_LUA = """
local minute = tonumber(redis.call('GET', KEYS[1]) or '0')
local day = tonumber(redis.call('GET', KEYS[2]) or '0')
if minute >= tonumber(ARGV[1]) or day >= tonumber(ARGV[2]) then
  return {0, minute, day}
end
minute = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
day = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, minute, day}
"""


def purchased_enough_sql(account_id: str) -> str:
    """Whether an account has purchased at least PURCHASE_THRESHOLD in total, as an SQL boolean; `account_id` is
    the SQL expression of its internal id. The one definition behind the day quota above and a key's
    `is_free_tier`.

    Purchased means paid for (`Entry.purchased_delta`): the total the journal keeps beside the balance
    (`balances.purchased`, migration 0022), one primary-key read, however many lots an account that tops up
    every day has had.
    """
    return (
        f"coalesce((SELECT pb.purchased FROM balances pb WHERE pb.account_id = {account_id}), 0)"
        f" >= {PURCHASE_THRESHOLD}"
    )


def day_limit(purchased_enough: bool) -> int:
    """The daily quota: larger once the account has purchased at least $10 of credits in total."""
    return PER_DAY_AFTER_PURCHASE if purchased_enough else PER_DAY


@dataclass(frozen=True, slots=True)
class Window:
    """One quota window of one account: its counter's key, its limit and when it resets."""

    name: WindowName
    key: str
    limit: int
    reset_at: datetime

    def ttl_seconds(self, now: datetime) -> int:
        return int((self.reset_at + _GRACE[self.name] - now).total_seconds()) + 1


def windows(account: str, now: datetime, per_day: int) -> tuple[Window, Window]:
    """The current UTC minute and UTC day of `account`. The `{account}` hash tag keeps both keys in one
    Redis Cluster slot, which a multi-key script needs."""
    minute = now.replace(second=0, microsecond=0)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return (
        Window("minute", f"free:{{{account}}}:m:{minute:%Y%m%d%H%M}", PER_MINUTE, minute + timedelta(minutes=1)),
        Window("day", f"free:{{{account}}}:d:{day:%Y%m%d}", per_day, day + timedelta(days=1)),
    )


@dataclass(frozen=True, slots=True)
class Usage:
    window: Window
    used: int

    @property
    def remaining(self) -> int:
        return max(self.window.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    minute: Usage
    day: Usage
    degraded: bool  # counted by the per-process fallback, not Redis

    @property
    def refused_by(self) -> Usage | None:
        """The window that refused the request; the day when both are full (it is the longer wait)."""
        if self.admitted:
            return None
        return self.day if self.day.remaining == 0 else self.minute


class MemoryCounter:
    """The Lua script's rule over a per-process dict: the fallback while Redis is unreachable.

    Atomic without a lock: nothing in `admit` awaits, so no other request runs in between.
    """

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, datetime]] = {}  # key -> (count, window's reset_at)
        self._next_sweep: datetime | None = None

    def admit(self, minute: Window, day: Window, now: datetime) -> tuple[bool, int, int]:
        self._sweep(now)
        m = self._counts.get(minute.key, (0, minute.reset_at))[0]
        d = self._counts.get(day.key, (0, day.reset_at))[0]
        if m >= minute.limit or d >= day.limit:
            return False, m, d
        self._counts[minute.key] = (m + 1, minute.reset_at)
        self._counts[day.key] = (d + 1, day.reset_at)
        return True, m + 1, d + 1

    def _sweep(self, now: datetime) -> None:
        """Forget finished windows, at most once a minute."""
        if self._next_sweep is not None and now < self._next_sweep:
            return
        self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        self._next_sweep = now + timedelta(minutes=1)


class FreeLimiter:
    """Admits or refuses one free-model request against both windows of its account."""

    def __init__(self, redis: Redis | None) -> None:
        self._script = redis.register_script(ADMIT_LUA) if redis is not None else None
        self._memory = MemoryCounter()
        self._skip_redis_until = 0.0  # time.monotonic(); not the business clock, which tests move
        if redis is None:
            log.warning("REDIS_URL is not set: free-model quotas are counted per process (degraded)")

    async def admit(self, account: str, per_day: int, now: datetime) -> Verdict:
        minute, day = windows(account, now, per_day)
        counted = await self._redis_admit(minute, day, now)
        degraded = counted is None
        admitted, m, d = self._memory.admit(minute, day, now) if counted is None else counted
        return Verdict(admitted, Usage(minute, m), Usage(day, d), degraded)

    async def _redis_admit(self, minute: Window, day: Window, now: datetime) -> tuple[bool, int, int] | None:
        """The script's verdict, or None when Redis is absent or failing."""
        if self._script is None or time.monotonic() < self._skip_redis_until:
            return None
        try:
            admitted, m, d = await self._script(
                keys=[minute.key, day.key],
                args=[minute.limit, day.limit, minute.ttl_seconds(now), day.ttl_seconds(now)],
            )
        except (RedisError, OSError) as exc:
            self._skip_redis_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
            log.warning("Redis unreachable (%s): free-model quotas are counted per process for now", exc)
            return None
        return bool(admitted), int(m), int(d)
