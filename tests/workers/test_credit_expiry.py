"""Credit expiry (SPEC §5 Expiry): what is left of an expired lot moves to breakage, once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import ModuleType

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.context import Context
from billing.jobs.expiry import expire_credits
from billing.settings import Settings
from tests.conftest import ADMIN, ROOT, Api, snapshot
from tests.workers.conftest import clock_moved, eventually, expired_lot, iso, worker_env

EXPIRY_POSTINGS = text(
    """SELECT p.lot_id, count(*), sum(p.amount) FROM postings p JOIN journal_entries e ON e.id = p.entry_id
    WHERE e.kind = 'expiry' AND p.lot_id = ANY(:lots) GROUP BY p.lot_id"""
)


async def expiry_postings(engine: AsyncEngine, lots: list[int]) -> dict[int, tuple[int, Decimal]]:
    async with engine.connect() as conn:
        rows = await conn.execute(EXPIRY_POSTINGS, {"lots": lots})
    return {lot: (count, total) for lot, count, total in rows}


async def breakage(engine: AsyncEngine) -> Decimal:
    async with engine.connect() as conn:
        total = await conn.scalar(
            text("SELECT coalesce(sum(p.amount), 0) FROM postings p JOIN accounts a ON a.id = p.account_id"
                 " WHERE a.public_id = 'breakage'")
        )  # fmt: skip
    return Decimal(total)


async def test_a_half_used_lot_expires_only_its_unused_half(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    account, lot = await expired_lot(jobs_api, "10.00", used="4.00")
    before = await jobs_api.balance(account)
    assert before["balance"] == "6.00"
    breakage_before = await breakage(jobs_engine)

    run = await expire_credits(ctx, now=datetime.now(UTC))

    ours = [a for a in run.accounts if a.account == account]
    assert len(ours) == 1 and ours[0].entry is not None
    assert [(x.lot, x.amount) for x in ours[0].lots] == [(f"lot_{lot}", Decimal("6"))]
    after = await jobs_api.balance(account)
    assert after["balance"] == "0.00"
    assert after["total_credits"] == before["total_credits"]  # expiry is not a refund: credits were added
    assert after["total_usage"] == before["total_usage"]
    assert await expiry_postings(jobs_engine, [lot]) == {lot: (1, Decimal("-6"))}
    assert await breakage(jobs_engine) - breakage_before >= Decimal("6")

    lots = (await jobs_api.client.get(f"/v1/accounts/{account}/lots", headers=ADMIN)).json()["data"]
    assert [x["remaining"] for x in lots] == ["0.00"]
    ledger = (await jobs_api.client.get(f"/v1/accounts/{account}/ledger", headers=ADMIN)).json()["data"]
    assert ledger[0]["kind"] == "expiry"

    again = await expire_credits(ctx, now=datetime.now(UTC))
    assert account not in {a.account for a in again.accounts}
    assert await expiry_postings(jobs_engine, [lot]) == {lot: (1, Decimal("-6"))}


async def test_live_lots_and_other_lots_are_untouched(ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine) -> None:
    account, expired = await expired_lot(jobs_api, "3.00")
    live = await jobs_api.grant(account, "2.00")
    await expire_credits(ctx, now=datetime.now(UTC))
    balance = await jobs_api.balance(account)
    assert balance["balance"] == "2.00"
    lots = (await jobs_api.client.get(f"/v1/accounts/{account}/lots", headers=ADMIN)).json()["data"]
    assert {x["id"]: x["remaining"] for x in lots} == {f"lot_{expired}": "0.00", live["lot"]["id"]: "2.00"}


async def test_dry_run_says_what_would_expire_and_changes_nothing(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine, jobs_settings: Settings
) -> None:
    account = (await jobs_api.account())["id"]
    lot = (await jobs_api.grant(account, "7.25", expires_at="2027-06-01T00:00:00Z"))["lot"]["id"]
    before = await snapshot(jobs_engine)

    run = await expire_credits(ctx, now=datetime(2027, 12, 1, tzinfo=UTC), dry_run=True)
    ours = [a for a in run.accounts if a.account == account]
    assert [(x.lot, x.amount, a.entry) for a in ours for x in a.lots] == [(lot, Decimal("7.25"), None)]

    out = subprocess.run(
        [sys.executable, "-m", "billing.cli", "expire", "--dry-run", "--as-of", "2027-12-01T00:00:00Z"],
        cwd=ROOT, env=worker_env(jobs_settings), capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f"{account}  {lot}  7.25 USD" in out
    assert "would expire as of 2027-12-01T00:00:00+00:00" in out
    assert await snapshot(jobs_engine) == before
    assert (await jobs_api.balance(account))["balance"] == "7.25"


async def test_as_of_is_only_for_a_dry_run(jobs_settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", "expire", "--as-of", iso(datetime(2030, 1, 1, tzinfo=UTC))],
        cwd=ROOT, env=worker_env(jobs_settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "--dry-run" in done.stderr


async def test_concurrent_runs_post_exactly_one_entry_per_lot(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    made = [await expired_lot(jobs_api, "5.00", used="1.00" if i % 2 else None) for i in range(6)]
    lots = [lot for _, lot in made]
    now = datetime.now(UTC)
    runs = await asyncio.gather(*(expire_credits(ctx, now=now) for _ in range(4)))

    posted = await expiry_postings(jobs_engine, lots)
    assert posted == {lot: (1, Decimal("-4") if i % 2 else Decimal("-5")) for i, lot in enumerate(lots)}
    accounts = [a.account for run in runs for a in run.accounts if a.account in {acct for acct, _ in made}]
    assert sorted(accounts) == sorted(acct for acct, _ in made)  # each account expired by exactly one run
    for account, _ in made:
        assert (await jobs_api.balance(account))["balance"] == "0.00"


async def test_the_actor_expires_credits_and_a_duplicate_message_posts_nothing_more(
    actors: ModuleType, worker: subprocess.Popen[bytes], jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    made = [await expired_lot(jobs_api, "2.50", used="0.50") for _ in range(3)]
    lots = [lot for _, lot in made]
    for _ in range(3):  # at-least-once delivery: the same job several times, concurrently on 4 threads
        actors.expire_credits.send()

    async def expired() -> bool:
        return len(await expiry_postings(jobs_engine, lots)) == len(lots)

    await eventually(expired, "the worker to expire the lots")
    await asyncio.to_thread(actors.broker.join, "default", timeout=60_000)  # every message done
    assert await expiry_postings(jobs_engine, lots) == {lot: (1, Decimal("-2")) for lot in lots}


async def test_billing_expire_posts_breakage_now(
    jobs_api: Api, jobs_engine: AsyncEngine, jobs_settings: Settings
) -> None:
    account, lot = await expired_lot(jobs_api, "1.50", used="0.25")
    out = subprocess.run(
        [sys.executable, "-m", "billing.cli", "expire"],
        cwd=ROOT, env=worker_env(jobs_settings), capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f"{account}  lot_{lot}  1.25 USD" in out and "  je_" in out
    assert await expiry_postings(jobs_engine, [lot]) == {lot: (1, Decimal("-1.25"))}
    assert (await jobs_api.balance(account))["balance"] == "0.00"


async def _held_before_expiry(api: Api, expiry: datetime, amount: str = "5.00") -> tuple[str, dict[str, str], str]:
    """An account with a $10 lot expiring at `expiry` and a hold of `amount` made a minute before it: the
    account, the gateway's headers, the hold."""
    gateway = await api.token(["gateway"])
    with clock_moved(expiry - timedelta(days=10)):
        account = (await api.account())["id"]
        await api.grant(account, "10.00", expires_at=iso(expiry))
    with clock_moved(expiry - timedelta(minutes=1)):
        r = await api.client.post(
            "/v1/holds", headers=gateway, json={"account": account, "amount": amount, "request_id": f"req-{account}"}
        )
        assert r.status_code == 201, r.text
    return account, gateway, r.json()["id"]


async def test_credits_held_before_expiry_and_captured_after_are_spent_not_expired(ctx: Context, jobs_api: Api) -> None:
    """SPEC §5: a hold reserves credits and a finished generation is paid from them; only unused credits
    expire. Captured after the lot expired, expired after that: $5 spent, $5 to breakage, no debt."""
    expiry = datetime.now(UTC) - timedelta(days=1)
    account, gateway, hold = await _held_before_expiry(jobs_api, expiry)
    with clock_moved(expiry + timedelta(minutes=1)):
        r = await jobs_api.client.post(
            f"/v1/holds/{hold}/capture", headers=gateway, json={"generation_id": f"gen-{account}", "cost": "5.00"}
        )
        assert r.status_code == 200, r.text
    run = await expire_credits(ctx, now=datetime.now(UTC))
    assert [a.total for a in run.accounts if a.account == account] == [Decimal("5")]
    assert (await jobs_api.balance(account))["balance"] == "0.00"


async def test_expiry_between_a_hold_and_its_capture_leaves_what_the_hold_reserves(ctx: Context, jobs_api: Api) -> None:
    """The other order settles alike: expiry leaves the held $5 of the lot, the capture pays from it (what
    it costs beyond its hold comes from live lots only: here, debt)."""
    expiry = datetime.now(UTC) - timedelta(days=1)
    account, gateway, hold = await _held_before_expiry(jobs_api, expiry)
    first = await expire_credits(ctx, now=expiry + timedelta(seconds=30))
    assert [a.total for a in first.accounts if a.account == account] == [Decimal("5")]
    assert (await jobs_api.balance(account))["balance"] == "5.00"
    with clock_moved(expiry + timedelta(minutes=1)):
        r = await jobs_api.client.post(
            f"/v1/holds/{hold}/capture", headers=gateway, json={"generation_id": f"gen-{account}", "cost": "6.00"}
        )
        assert r.status_code == 200, r.text
    again = await expire_credits(ctx, now=datetime.now(UTC))
    assert [a for a in again.accounts if a.account == account] == []
    assert (await jobs_api.balance(account))["balance"] == "-1.00"


async def test_what_an_open_hold_reserved_expires_once_the_hold_times_out(ctx: Context, jobs_api: Api) -> None:
    expiry = datetime.now(UTC) - timedelta(days=1)
    account, _, _ = await _held_before_expiry(jobs_api, expiry, amount="4.00")
    dry = await expire_credits(ctx, now=expiry + timedelta(minutes=2), dry_run=True)
    assert [a.total for a in dry.accounts if a.account == account] == [Decimal("6")]
    first = await expire_credits(ctx, now=expiry + timedelta(minutes=2))
    assert [a.total for a in first.accounts if a.account == account] == [Decimal("6")]
    still = await expire_credits(ctx, now=expiry + timedelta(minutes=5))
    assert [a for a in still.accounts if a.account == account] == []
    assert (await jobs_api.balance(account))["balance"] == "4.00"  # the hold runs 10 minutes: still reserved
    later = await expire_credits(ctx, now=expiry + timedelta(minutes=9, seconds=1))  # the hold timed out
    assert [a.total for a in later.accounts if a.account == account] == [Decimal("4")]
    assert (await jobs_api.balance(account))["balance"] == "0.00"
