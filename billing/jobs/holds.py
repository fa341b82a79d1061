"""Hold expiry (SPEC §5 Holds: "an expired hold releases itself").

Holds are not journal entries, so expiring one is a status change only: `open` → `expired`. Nothing about
money waits for this job: `held` and `available` already stop counting a hold at its `expires_at`
(billing/gateway/service.py). The job makes the status say what is already true.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import text

from billing.context import Context

BATCH_SIZE = 1000

# The due holds are found among the open ones (`open_holds`, which holds nothing else) and locked in `holds`
# with SKIP LOCKED: a concurrent run, or a capture holding the row, is skipped, never waited on and never
# counted twice. The LIMIT counts the rows locked, not those passed over, so a run stops only when fewer than a
# batch of due holds are left to it; a hold resolved meanwhile fails the status check on its locked row.
# (Locking `open_holds` instead would take the locks in the other order than a capture, which updates the hold
# and then, through the trigger, deletes its open row.)
EXPIRE_DUE = text(
    """WITH due AS (
    SELECT h.id FROM open_holds o JOIN holds h ON h.id = o.hold_id
    WHERE o.expires_at <= :cutoff AND h.status = 'open'
    ORDER BY o.expires_at, o.hold_id LIMIT :batch
    FOR UPDATE OF h SKIP LOCKED)
UPDATE holds h SET status = 'expired', resolved_at = now(),
       resolution = jsonb_build_object('expired_at', h.expires_at)
FROM due WHERE h.id = due.id AND h.status = 'open'
RETURNING h.id"""
)


async def expire_holds(
    ctx: Context, *, now: datetime, grace: timedelta = timedelta(0), batch_size: int = BATCH_SIZE
) -> int:
    """Mark open holds whose `expires_at` is at least `grace` before `now` as `expired`, one batch per
    transaction; returns how many this run marked.

    The grace keeps the job clear of a capture decided just before the expiry (on a clock a little behind
    this one): the gateway refuses to capture a hold past its expiry, but it decides before it writes.
    """
    cutoff = now - grace
    marked = 0
    while True:
        async with ctx.db.begin() as conn:
            ids = (await conn.execute(EXPIRE_DUE, {"cutoff": cutoff, "batch": batch_size})).scalars().all()
        marked += len(ids)
        if len(ids) < batch_size:
            return marked


async def count_due_holds(ctx: Context, *, now: datetime, grace: timedelta = timedelta(0)) -> int:
    """How many holds `expire_holds` would mark at `now` (a dry run)."""
    async with ctx.db.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM open_holds WHERE expires_at <= :cutoff"), {"cutoff": now - grace}
        )
    return int(count or 0)
