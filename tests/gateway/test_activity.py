"""An account's activity: its charged generations, newest first, paginated, and exported as CSV (SPEC §2:
the customer dashboard's "activity with CSV export")."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.db.engine import CUSTOM_PLANS
from billing.gateway import activity
from tests import plans
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import Gateway, funded

# Ten days ahead, at midnight: inside the granted credits' lifetime, and a whole day apart from the test's
# other times.
DAY = (datetime.now(UTC) + timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def _activity(client: AsyncTestClient, account: str, headers: dict[str, str] = ADMIN, **params: Any) -> Any:
    return await client.get(f"/v1/accounts/{account}/generations", params=params, headers=headers)


async def _export(client: AsyncTestClient, account: str, headers: dict[str, str] = ADMIN, **params: Any) -> Any:
    return await client.get(f"/v1/accounts/{account}/generations.csv", params=params, headers=headers)


async def _charged(api: Api, gw: Gateway, client: AsyncTestClient, clock_at: Any) -> tuple[str, str, list[str]]:
    """An account with a key and four charged generations a day apart (one through the key, one BYOK, one
    captured from a hold), a refusal, and another account's charge; the generation ids oldest first."""
    acct = await funded(api, "10.00")
    key = (await client.post(f"/v1/accounts/{acct}/keys", json={"reason": "test", "name": "k"}, headers=ADMIN)).json()[
        "id"
    ]
    ids = []
    clock_at(DAY)
    ids.append((await gw.charge(account=acct, cost="0.10", model='=HYPERLINK("x")')).json()["id"])
    clock_at(DAY + timedelta(days=1))
    ids.append((await gw.charge(key=key, cost="0.000000000001", model="m1", provider="p")).json()["id"])
    await gw.charge(expect=402, account=acct, cost="100.00")  # refused: a record, not activity
    clock_at(DAY + timedelta(days=2))
    ids.append((await gw.charge(account=acct, is_byok=True, byok_list_cost="2.00")).json()["id"])
    clock_at(DAY + timedelta(days=3))
    hold = (await gw.hold(account=acct, amount="1.00")).json()["id"]
    ids.append((await gw.capture(hold, cost="0.25")).json()["generation"]["id"])
    await gw.charge(account=await funded(api, "1.00"), cost="0.10")  # someone else's
    return acct, key, ids


async def test_activity_lists_the_accounts_charged_generations_newest_first_by_page(
    api: Api, gw: Gateway, client: AsyncTestClient, clock_at: Any
) -> None:
    acct, key, ids = await _charged(api, gw, client, clock_at)

    first = (await _activity(client, acct, limit=3)).json()
    assert [g["id"] for g in first["data"]] == ids[::-1][:3] and first["has_more"] is True
    rest = (await _activity(client, acct, limit=3, starting_after=first["data"][-1]["id"])).json()
    assert [g["id"] for g in rest["data"]] == [ids[0]] and rest["has_more"] is False
    one = (await client.get(f"/v1/generations/{ids[1]}", headers=ADMIN)).json()
    assert first["data"][2] == one  # the same record as a single read
    assert (one["key"], one["total_cost"], one["model"]) == (key, "0.000000000001", "m1")

    assert [g["id"] for g in (await _activity(client, acct, key=key)).json()["data"]] == [ids[1]]
    window = await _activity(client, acct, since=iso(DAY + timedelta(days=1)), until=iso(DAY + timedelta(days=2)))
    assert [g["id"] for g in window.json()["data"]] == [ids[1]]

    own = await api.token(["account"], account=acct)
    assert [g["id"] for g in (await _activity(client, acct, own)).json()["data"]] == ids[::-1]
    other = await api.token(["account"], account=await funded(api))
    assert (await _activity(client, acct, other)).status_code == 404  # another account's: not found


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"since": "1741600000"}, 400, "invalid_parameter"),  # a bare number is not read as Unix seconds
        ({"since": "2031-03-10T00:00:00"}, 400, "timezone_required"),
        ({"since": "2031-03-12T00:00:00Z", "until": "2031-03-11T00:00:00Z"}, 400, "invalid_range"),
        ({"starting_after": "gen-nobody-has"}, 404, "generation_not_found"),
        ({"limit": "101"}, 400, None),
    ],
)
async def test_bad_activity_queries_are_refused(
    api: Api, client: AsyncTestClient, params: dict[str, str], status: int, code: str | None
) -> None:
    r = await _activity(client, await funded(api), **params)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code


async def test_activity_exports_as_csv_every_generation_of_the_range(
    api: Api, gw: Gateway, client: AsyncTestClient, clock_at: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct, key, ids = await _charged(api, gw, client, clock_at)
    monkeypatch.setattr(activity, "EXPORT_PAGE", 3)  # four rows: a second page

    since, until = DAY - timedelta(days=1), DAY + timedelta(days=5)
    r = await _export(client, acct, since=iso(since), until=iso(until))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == (
        f'attachment; filename="activity-{acct}-{since:%Y%m%dT%H%M%SZ}-{until:%Y%m%dT%H%M%SZ}.csv"'
    )
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == list(activity.COLUMNS)
    assert [row["id"] for row in rows] == ids[::-1]
    first, keyed, byok, captured = rows[::-1]
    assert (first["model"], first["total_cost"]) == ('\'=HYPERLINK("x")', "0.10")  # not a formula
    assert first["created_at"].endswith("Z")
    assert timedelta(0) <= datetime.fromisoformat(first["created_at"]) - DAY < timedelta(seconds=5)
    assert (keyed["key"], keyed["total_cost"], keyed["provider"]) == (key, "0.000000000001", "p")
    assert (byok["is_byok"], byok["byok_list_cost"], byok["byok_fee"]) == ("true", "2.00", "0.00")
    assert captured["hold"].startswith("hold_") and captured["total_cost"] == "0.25"

    # The default: the 30 days before now (the service's clock).
    clock_at(DAY + timedelta(days=30, seconds=1))
    recent = list(csv.DictReader(io.StringIO((await _export(client, acct)).text)))
    assert [row["id"] for row in recent] == ids[::-1][:3]  # the first, 31 days ago, is outside


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"since": "2030-01-01T00:00:00Z", "until": "2031-03-01T00:00:00Z"}, "export_range_too_long"),
        ({"since": "2031-03-02T00:00:00Z", "until": "2031-03-01T00:00:00Z"}, "invalid_range"),
        ({"until": "not a time"}, "invalid_parameter"),
    ],
)
async def test_a_bad_export_is_refused_before_anything_is_sent(
    api: Api, client: AsyncTestClient, params: dict[str, str], code: str
) -> None:
    r = await _export(client, await funded(api), **params)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


async def test_a_page_of_a_busy_accounts_activity_reads_about_its_own_rows(api: Api, engine: AsyncEngine) -> None:
    """An account with thousands of generations pays for a page of 21, not for its history: the page is read with
    a plan made for its own values (`CUSTOM_PLANS`), where the generic plan the service's statements run with
    read every generation of the account below the cursor, then sorted them (counted in rows, not timed)."""
    account = (await api.account())["id"]
    async with engine.begin() as conn:
        internal = await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :a"), {"a": account})
        await conn.execute(
            text("INSERT INTO generations (generation_id, account_id, status, fingerprint, total_cost, created_at)"
                 " SELECT 'gen-busy-' || :a || '-' || n, :a, 'charged', 'f', 0.01, now() - n * interval '1 minute'"
                 " FROM generate_series(1, 3000) AS n"),
            {"a": internal},
        )  # fmt: skip
        await conn.execute(text("ANALYZE generations"))
    async with engine.begin() as conn:
        await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")  # as the service's connections
        await conn.exec_driver_sql(plans.prepare("busy_page", str(activity._PAGE)))
        values = {
            "account": str(internal),
            "key": "NULL",
            "since": "NULL",
            "until": "NULL",
            "before": "9e15",
            "n": "21",
        }
        await conn.exec_driver_sql(CUSTOM_PLANS)
        explain = plans.explain("busy_page", str(activity._PAGE), values, analyze=True)
        (plan,) = (await conn.exec_driver_sql(explain)).scalar_one()
        await conn.exec_driver_sql("DEALLOCATE busy_page")
    assert plans.rows_read(plan["Plan"], "generations") <= 25  # of 3,000
