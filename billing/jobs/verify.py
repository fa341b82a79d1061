"""The ledger verification job (SPEC §4, §9): every invariant of `billing.verify`, checked on one consistent
snapshot. It reports, never edits: each broken invariant is logged at ERROR and counted in a metric.

The metric is Prometheus text (`metrics_text`): `billing verify` prints it, and the scheduled job keeps the
last one in Redis (`LAST_RESULT_KEY` under the queue namespace) for whatever scrapes or alerts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from billing import clock
from billing.context import Context
from billing.verify import CHECKS, verify_ledger

log = logging.getLogger(__name__)

LAST_RESULT_KEY = "ledger_verification"


@dataclass(frozen=True, slots=True)
class Verification:
    checked_at: datetime
    problems: dict[str, list[object]]  # check → up to 20 offending ids

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify(ctx: Context) -> Verification:
    """Run every check in one read-only REPEATABLE READ transaction and log each problem at ERROR."""
    async with ctx.db.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        checked_at = clock.now()
        problems = await verify_ledger(conn)
        await conn.rollback()
    for check, ids in problems.items():
        log.error("ledger invariant broken: %s (ids, at most 20: %s)", check, ids)
    return Verification(checked_at, problems)


def metrics_text(result: Verification) -> str:
    """Prometheus text exposition: one gauge per check (offending rows, capped at 20), ok, and when."""
    lines = [
        "# HELP billing_ledger_problems Rows breaking a ledger invariant at the last verification (capped at 20).",
        "# TYPE billing_ledger_problems gauge",
    ]
    lines += [f'billing_ledger_problems{{check="{check}"}} {len(result.problems.get(check, ()))}' for check in CHECKS]
    lines += [
        "# HELP billing_ledger_ok 1 when every ledger invariant held at the last verification.",
        "# TYPE billing_ledger_ok gauge",
        f"billing_ledger_ok {int(result.ok)}",
        "# HELP billing_ledger_verified_at_seconds When the last verification ran (Unix time).",
        "# TYPE billing_ledger_verified_at_seconds gauge",
        f"billing_ledger_verified_at_seconds {int(result.checked_at.timestamp())}",
    ]
    return "\n".join(lines) + "\n"


def result_json(result: Verification) -> str:
    return json.dumps(
        {
            "checked_at": result.checked_at.isoformat(),
            "ok": result.ok,
            "problems": {k: [str(i) for i in v] for k, v in result.problems.items()},
            "metrics": metrics_text(result),
        }
    )
