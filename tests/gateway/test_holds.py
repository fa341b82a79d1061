"""Holds: reserve, capture (less, more), release, at most once, expiry, 402 refusals, generation ids."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.errors import ApiError
from billing.gateway import schemas as s
from billing.gateway import service
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import Gateway, funded
from tests.gateway.test_batch import GATEWAY, waiting_on_a_lock


async def test_capture_less_releases_the_rest(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.40")).json()
    assert (await api.balance(acct))["held"] == "0.40" and (await api.balance(acct))["available"] == "0.60"
    out = (await gw.capture(hold["id"], cost="0.15", model="m")).json()
    assert out["hold"]["status"] == "captured" and out["generation"]["total_cost"] == "0.15"
    assert out["generation"]["hold"] == hold["id"]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"], balance["available"], balance["total_usage"]) == (
        "0.85", "0.00", "0.85", "0.15",
    )  # fmt: skip


async def test_capture_more_than_held_is_charged_and_may_go_negative(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.50")).json()
    await gw.capture(hold["id"], cost="1.30")
    balance = await api.balance(acct)
    assert balance["balance"] == "-0.30" and balance["total_usage"] == "1.30"
    # Debt is lot-less: the lot is empty, and the next credit pays the debt first.
    await api.grant(acct, "1.00")
    lots = (await api.client.get(f"/v1/accounts/{acct}/lots", headers=ADMIN)).json()["data"]
    assert [lot["remaining"] for lot in lots] == ["0.00", "0.70"]
    assert (await api.balance(acct))["balance"] == "0.70"


async def test_release_returns_everything_and_resolves_once(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.70")).json()
    assert (await gw.release(hold["id"])).json()["status"] == "released"
    again = await gw.release(hold["id"])
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["status"] == "released"
    r = await gw.capture(hold["id"], expect=409, cost="0.10")
    assert r.json()["error"]["code"] == "hold_already_resolved"
    assert (await api.balance(acct))["available"] == "1.00"


async def test_capture_retry_replays_and_never_double_charges(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.50")).json()
    body = {"generation_id": "gen-replay-" + hold["id"] + acct, "cost": "0.20"}
    first = await gw.capture(hold["id"], **body)
    second = await gw.capture(hold["id"], **body)
    assert second.json() == first.json() and second.headers.get("idempotent-replayed") == "true"
    other = await gw.capture(hold["id"], expect=409, generation_id=body["generation_id"], cost="0.30")
    assert other.json()["error"]["code"] == "hold_already_resolved"
    assert (await api.balance(acct))["balance"] == "0.80"


async def _generations(engine: AsyncEngine, generation_id: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text("SELECT hold_id, total_cost FROM generations WHERE generation_id = :g"), {"g": generation_id}
                )
            ).all()
        )


async def test_capture_naming_another_generations_id_is_409_and_writes_nothing(
    api: Api, gw_path: Gateway, engine: AsyncEngine
) -> None:
    """SPEC §4: a generation id is an idempotency key. A capture naming one already recorded — by a one-shot
    charge, or by another hold's capture — reuses it with a different request: 409, nothing written, the hold
    still open. The same capture again still replays."""
    gw = gw_path
    acct = await funded(api, "1.00")
    charged, captured = f"gen-{uuid.uuid4().hex}", f"gen-{uuid.uuid4().hex}"
    await gw.charge(account=acct, generation_id=charged, cost="0.10")
    first = (await gw.hold(account=acct, amount="0.20")).json()["id"]
    done = await gw.capture(first, generation_id=captured, cost="0.10")
    hold = (await gw.hold(account=acct, amount="0.20")).json()["id"]
    for taken in (charged, captured):
        r = await gw.capture(hold, expect=409, generation_id=taken, cost="0.10")
        assert r.json()["error"]["code"] == "idempotency_key_reused"
        assert len(await _generations(engine, taken)) == 1
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"], balance["total_usage"]) == ("0.80", "0.20", "0.20")
    again = await gw.capture(first, generation_id=captured, cost="0.10")
    assert again.json() == done.json() and again.headers.get("idempotent-replayed") == "true"
    await gw.capture(hold, cost="0.10")  # still open: captured under a generation id of its own
    assert (await api.balance(acct))["balance"] == "0.70"


async def test_capture_whose_generation_id_another_account_records_meanwhile_is_409(
    api: Api, gw: Gateway, client_ctx: Any, engine: AsyncEngine
) -> None:
    """Another account's charge records the generation id after the capture read its state (it takes another
    balance row's lock, so nothing makes the two wait for each other until the unique constraint does): still a
    409, not the constraint's error."""
    acct, other = await funded(api, "1.00"), await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.20")).json()["id"]
    generation_id = f"gen-{uuid.uuid4().hex}"
    capture = msgspec.convert({"generation_id": generation_id, "cost": "0.10"}, s.Capture)
    async with engine.connect() as charging:
        await charging.execute(  # what a $0 charge on the other account writes: its generation, no entry
            text(
                "INSERT INTO generations (generation_id, account_id, status, fingerprint, total_cost)"
                " SELECT :g, id, 'charged', 'another request', 0 FROM accounts WHERE public_id = :a"
            ),
            {"g": generation_id, "a": other},
        )
        capturing = asyncio.ensure_future(service.resolve_hold(client_ctx, GATEWAY, hold, capture))
        assert await waiting_on_a_lock(engine, capturing), "the capture never waited on the other generation"
        await charging.commit()
    with pytest.raises(ApiError) as refused:
        await capturing
    assert (refused.value.status, refused.value.code) == (409, "idempotency_key_reused")
    assert await _generations(engine, generation_id) == [(None, 0)]
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"]) == ("1.00", "0.20")


async def test_hold_refused_when_available_cannot_cover(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    await gw.hold(account=acct, amount="0.80")
    request_id = f"req-refused-{acct}"
    r = await gw.hold(expect=402, account=acct, amount="0.30", request_id=request_id)
    error = r.json()["error"]
    assert error["code"] == "insufficient_credits" and error["limit_source"] == "credits"
    assert error["available"] == "0.20" and error["type"] == "ledger_error"
    # The same request id again is refused the same way, even though credits arrived meanwhile.
    await api.grant(acct, "5.00")
    again = await gw.hold(expect=402, account=acct, amount="0.30", request_id=request_id)
    assert again.json() == r.json() and again.headers.get("idempotent-replayed") == "true"


async def test_hold_refused_when_balance_not_positive(api: Api, gw: Gateway) -> None:
    acct = (await api.account())["id"]
    r = await gw.hold(expect=402, account=acct, amount="0.000000000001")
    assert r.json()["error"]["limit_source"] == "credits" and r.json()["error"]["available"] == "0.00"


async def test_expired_hold_stops_counting_at_expiry_and_cannot_resolve(api: Api, gw: Gateway, clock_at) -> None:  # type: ignore[no-untyped-def]
    acct = await funded(api, "1.00")
    start = datetime.now(UTC)
    clock_at(start)
    hold = (await gw.hold(account=acct, amount="0.90", timeout_seconds=60)).json()
    assert (await gw.hold(expect=402, account=acct, amount="0.50")).json()["error"]["available"] == "0.10"
    clock_at(start + timedelta(seconds=61))  # no job has run: the hold stops counting by itself
    await gw.hold(account=acct, amount="0.50")
    r = await gw.capture(hold["id"], expect=409, cost="0.10")
    assert r.json()["error"]["code"] == "hold_expired"
    r = await gw.release(hold["id"], expect=409)
    assert r.json()["error"]["code"] == "hold_expired"
    assert (await api.balance(acct))["balance"] == "1.00"


async def test_foreign_or_unknown_hold_is_404_and_changes_nothing(api: Api, gw: Gateway) -> None:
    mine = await funded(api, "1.00")
    theirs = await funded(api, "1.00")
    hold = (await gw.hold(account=theirs, amount="0.50")).json()
    r = await gw.capture(hold["id"], expect=404, account=mine, cost="0.10")
    assert r.json()["error"]["code"] == "hold_not_found"
    await gw.capture("hold_999999999", expect=404, cost="0.10")
    await gw.capture("nonsense", expect=404, cost="0.10")
    assert (await api.balance(theirs))["held"] == "0.50"


async def test_same_request_id_other_body_is_409(api: Api, gw: Gateway) -> None:
    acct = await funded(api, "1.00")
    await gw.hold(account=acct, amount="0.10", request_id="req-same-" + acct)
    r = await gw.hold(expect=409, account=acct, amount="0.20", request_id="req-same-" + acct)
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert (await api.balance(acct))["held"] == "0.10"


async def test_hold_marked_expired_by_the_job_still_answers_hold_expired(api: Api, gw: Gateway, client_ctx) -> None:  # type: ignore[no-untyped-def]
    from billing.jobs.holds import expire_holds

    acct = await funded(api, "1.00")
    hold = (await gw.hold(account=acct, amount="0.30", timeout_seconds=1)).json()
    marked = await expire_holds(client_ctx, now=datetime.fromisoformat(hold["expires_at"]) + timedelta(seconds=1))
    assert marked >= 1
    assert (await gw.capture(hold["id"], expect=409, cost="0.10")).json()["error"]["code"] == "hold_expired"
    assert (await gw.release(hold["id"], expect=409)).json()["error"]["code"] == "hold_expired"


async def test_expired_credits_are_not_spendable_before_the_expiry_job(api: Api, gw: Gateway, clock_at) -> None:  # type: ignore[no-untyped-def]
    acct = (await api.account())["id"]
    start = datetime.now(UTC)
    await api.grant(acct, "1.00", expires_at=(start + timedelta(days=1)).isoformat())
    await api.grant(acct, "0.50")
    clock_at(start + timedelta(days=1, seconds=1))  # the first lot has expired; no job has run
    balance = await api.balance(acct)
    assert (balance["balance"], balance["available"]) == ("1.50", "0.50")
    r = await gw.hold(expect=402, account=acct, amount="0.60")
    assert r.json()["error"]["available"] == "0.50"
    assert (await gw.charge(expect=402, account=acct, cost="0.60")).json()["error"]["available"] == "0.50"
    await gw.charge(account=acct, cost="0.50")
    assert (await api.balance(acct))["balance"] == "1.00"  # only the expired lot is left, for breakage


async def test_what_an_open_hold_reserves_of_an_expired_lot_is_counted_once(
    api: Api, gw_path: Gateway, clock_at
) -> None:  # type: ignore[no-untyped-def]
    """A hold taken while a lot was live is paid from that lot when captured, even after it has expired (SPEC §5
    Holds). Until then what it reserves of the expired lot is held — not unspendable as well, which would keep
    the account's other credits from being spent. Holds and charges, batched and single."""
    gw = gw_path
    acct = (await api.account())["id"]
    start = datetime.now(UTC)
    await api.grant(acct, "1.00", expires_at=(start + timedelta(days=1)).isoformat())
    clock_at(start + timedelta(hours=23))
    first = (await gw.hold(account=acct, amount="0.80", timeout_seconds=7200)).json()  # 0.80 of that lot
    await api.grant(acct, "0.50")
    clock_at(start + timedelta(days=1, seconds=1))  # the first lot has expired; no job has run
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"], balance["available"]) == ("1.50", "0.80", "0.50")

    await gw.charge(account=acct, cost="0.10")
    assert (await gw.hold(expect=402, account=acct, amount="0.41")).json()["error"]["available"] == "0.40"
    second = (await gw.hold(account=acct, amount="0.40")).json()
    assert (await gw.charge(expect=402, account=acct, cost="0.01")).json()["error"]["available"] == "0.00"

    await gw.capture(first["id"], cost="0.80")  # from the expired lot it reserved
    await gw.capture(second["id"], cost="0.40")
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"], balance["available"]) == ("0.20", "0.00", "0.00")  # breakage's


async def test_open_holds_are_the_holds_still_open_whatever_opened_or_resolved_them(
    api: Api, gw_path: Gateway, engine: AsyncEngine, client_ctx: Any
) -> None:
    """What admissions count as held is read from `open_holds`, which the database keeps from `holds`
    (migration 0019): a hold opened is in it, a refused one never, and a capture, a release or the expiry job
    takes it out — on the batched path and on the single one."""
    from billing.jobs.holds import expire_holds

    gw = gw_path
    acct = await funded(api, "1.00")
    opened = [(await gw.hold(account=acct, amount="0.20")).json() for _ in range(3)]
    expiring = (await gw.hold(account=acct, amount="0.10", timeout_seconds=1)).json()
    assert (await gw.hold(expect=402, account=acct, amount="0.50")).json()["error"]["limit_source"] == "credits"

    async def open_holds() -> dict[str, str]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT o.hold_id, o.amount FROM open_holds o JOIN accounts a ON a.id = o.account_id"
                     " WHERE a.public_id = :a"),
                {"a": acct},
            )  # fmt: skip
        return {f"hold_{hold}": f"{amount:.2f}" for hold, amount in rows}

    ids = [h["id"] for h in opened]
    assert await open_holds() == {**dict.fromkeys(ids, "0.20"), expiring["id"]: "0.10"}
    await gw.capture(ids[0], cost="0.05")
    await gw.release(ids[1])
    assert await expire_holds(client_ctx, now=datetime.fromisoformat(expiring["expires_at"]) + timedelta(seconds=1))
    assert await open_holds() == {ids[2]: "0.20"}
    balance = await api.balance(acct)
    assert (balance["balance"], balance["held"], balance["available"]) == ("0.95", "0.20", "0.75")
