"""An account's activity: its charged generations, newest first — what the customer dashboard lists and
exports as CSV, and what support looks through (SPEC §2: "activity with CSV export").

Both read the generation records the hot path writes (`generations`, through its `(account_id, id)` index),
with the fields `GET /v1/generations/{id}` answers. A page is cursor-paginated like every list here; the
export is every generation of a time range (30 days before `until` unless `since` is given, at most
`MAX_EXPORT_DAYS`), streamed in pages so an account's whole month never sits in memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text

from billing import clock
from billing.auth.principal import Principal
from billing.context import Context
from billing.db.engine import CUSTOM_PLANS
from billing.errors import invalid, not_found
from billing.gateway import schemas as s
from billing.gateway.service import GENERATION_FROM, generation_of
from billing.organizations.service import find_account_to_act_for
from billing.schemas import ListOf, timestamp_field

MAX_PAGE = 100
EXPORT_PAGE = 1000
DEFAULT_EXPORT_DAYS = 30
MAX_EXPORT_DAYS = 366

_PAGE = text(
    GENERATION_FROM
    + """
WHERE g.account_id = :account AND g.status = 'charged'
  AND (CAST(:key AS text) IS NULL OR k.public_id = CAST(:key AS text))
  AND (CAST(:since AS timestamptz) IS NULL OR g.created_at >= CAST(:since AS timestamptz))
  AND (CAST(:until AS timestamptz) IS NULL OR g.created_at < CAST(:until AS timestamptz))
  AND g.id < :before
ORDER BY g.id DESC LIMIT :n"""
)
_CURSOR = text("SELECT id FROM generations WHERE generation_id = :g AND account_id = :account AND status = 'charged'")

# The export's columns: the generation's own fields, in the order a spreadsheet reads them.
COLUMNS = (
    "created_at", "id", "key", "member", "model", "provider", "total_cost", "upstream_inference_cost",
    "cache_discount", "is_byok", "byok_list_cost", "byok_fee", "tokens_prompt", "tokens_completion",
    "native_tokens_reasoning", "native_tokens_cached", "finish_reason", "cancelled", "streamed",
    "zero_completion_insured", "hold", "entry",
)  # fmt: skip
# A cell a spreadsheet would read as a formula (model and provider names are the gateway's free text).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _time(raw: str | None, field: str) -> datetime | None:
    """A query's ISO 8601 time (not a bare number: no Unix seconds read as a date of 1970)."""
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise invalid(
            "invalid_parameter", f"`{field}` is an ISO 8601 time, e.g. 2026-11-01T00:00:00Z.", field
        ) from None
    return timestamp_field(value, field)


def _range(raw_since: str | None, raw_until: str | None, *, export: bool) -> tuple[datetime | None, datetime | None]:
    since, until = _time(raw_since, "since"), _time(raw_until, "until")
    if export:
        until = until or clock.now()
        since = since or until - timedelta(days=DEFAULT_EXPORT_DAYS)
        if until - since > timedelta(days=MAX_EXPORT_DAYS):
            raise invalid(
                "export_range_too_long", f"An export covers at most {MAX_EXPORT_DAYS} days: narrow `since`.", "since"
            )
    if since is not None and until is not None and since >= until:
        raise invalid("invalid_range", "`since` must be before `until`.", "since")
    return since, until


async def _rows(conn: Any, account: int, key: str | None, since: Any, until: Any, before: int, n: int) -> list[Any]:
    """A page, planned for its own values (`CUSTOM_PLANS`): for the generic plan of the service's connections an
    account had as many generations as the average one and the page's LIMIT was unknown, so it read every
    generation of the account below the cursor and sorted them (7,993 rows for a page of 21 of a busy account,
    session 22). With its values the planner walks `(account_id, id)` back from the cursor to the page's end."""
    params = {"account": account, "key": key, "since": since, "until": until, "before": before, "n": n}
    await conn.exec_driver_sql(CUSTOM_PLANS)
    return list((await conn.execute(_PAGE, params)).all())


async def list_generations(
    ctx: Context,
    principal: Principal,
    account: str,
    *,
    limit: int,
    starting_after: str | None,
    key: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> ListOf[s.GenerationOut]:
    """A page of the account's charged generations, newest first; `starting_after` is a generation id of
    the page before."""
    start, end = _range(since, until, export=False)
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        before = 2**63 - 1
        if starting_after is not None:
            cursor = await conn.scalar(_CURSOR, {"g": starting_after, "account": row.id})
            if cursor is None:
                raise not_found("generation", starting_after)
            before = cursor
        rows = await _rows(conn, row.id, key, start, end, before, limit + 1)
    return ListOf(data=[generation_of(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    cell = str(value)
    return "'" + cell if cell.startswith(_FORMULA) else cell


def csv_lines(rows: list[s.GenerationOut], *, header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(COLUMNS)
    for g in rows:
        writer.writerow([_cell(getattr(g, column)) for column in COLUMNS])
    return out.getvalue()


async def export_generations(
    ctx: Context,
    principal: Principal,
    account: str,
    *,
    key: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> tuple[str, AsyncIterator[str]]:
    """The file name and the CSV text of every charged generation of the account in [since, until), newest
    first. The account and the range are checked before anything is sent (a 4xx, not a broken download)."""
    start, end = _range(since, until, export=True)
    assert start is not None and end is not None
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)
    name = f"activity-{row.public_id}-{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}.csv"

    async def lines() -> AsyncIterator[str]:
        yield csv_lines([], header=True)
        before = 2**63 - 1
        while True:
            # One short read per page: no transaction stays open while the client downloads.
            async with ctx.db.connect() as conn:
                rows = await _rows(conn, row.id, key, start, end, before, EXPORT_PAGE)
            if not rows:
                return
            yield csv_lines([generation_of(r) for r in rows], header=False)
            if len(rows) < EXPORT_PAGE:
                return
            before = rows[-1].id

    return name, lines()
