"""The missing-credit reconciler (SPEC §5): a payment whose webhook never arrived is credited by the next
run, once, however many runs or workers race for it; the reverse (credits Stripe does not show as paid,
other amounts) is reported, never edited; young payments are left to their webhooks; every run is
recorded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import stripe
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.context import Context
from billing.reconcile.service import AMOUNT_MISMATCH, CREDITED, UNPAID_CREDIT, reconcile_payments
from billing.reconcile.stripe_payments import payments_since, retrieve_payment
from billing.settings import Settings
from tests.conftest import ADMIN, ROOT, Api, key
from tests.purchases.conftest import buy, pay
from tests.stripe_helpers import pay_at_emulator
from tests.workers.conftest import billing, eventually, raw_broker, running_worker, send, stop, worker_env

NOW = timedelta(0)  # no grace: every payment is old enough


async def paid_without_webhook(api: Api, client: AsyncTestClient, base: str, amount: str) -> tuple[str, dict[str, Any]]:
    """An account and a purchase whose PaymentIntent succeeded at Stripe; no webhook is registered there, so
    the service never hears of it."""
    account = (await api.account())["id"]
    purchase = (await buy(client, account, amount))["purchase"]
    await pay_at_emulator(base, purchase["payment_intent"])
    return account, purchase


async def purchase_entries(engine: AsyncEngine, payment_intent: str) -> int:
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                text(
                    "SELECT count(*) FROM journal_entries WHERE kind = 'purchase' AND description LIKE '%(' || :pi || ')%'"
                ),
                {"pi": payment_intent},
            )
            or 0
        )


async def fulfilment_source(engine: AsyncEngine, payment_intent: str) -> str | None:
    async with engine.connect() as conn:
        return await conn.scalar(
            text("SELECT source FROM fulfilments WHERE payment_intent = :pi"), {"pi": payment_intent}
        )


def mentions(runs: list[Any], kind: str, payment_intent: str) -> int:
    return sum(1 for run in runs for f in run.findings if f.kind == kind and f.payment_intent == payment_intent)


async def test_a_lost_webhook_is_credited_once_by_concurrent_runs_and_a_ticket_then_says_already_credited(
    recon_ctx: Context, recon_api: Api, recon_client: AsyncTestClient, recon_stripe: str, recon_engine: AsyncEngine,
    sdk: stripe.StripeClient,
) -> None:  # fmt: skip
    account, purchase = await paid_without_webhook(recon_api, recon_client, recon_stripe, "20.00")
    pi = purchase["payment_intent"]
    assert (await recon_api.balance(account))["balance"] == "0.00"

    # younger than the grace period: left to its webhook
    young = await reconcile_payments(recon_ctx, sdk, grace=timedelta(hours=1))
    assert young.young >= 1 and mentions([young], CREDITED, pi) == 0
    assert (await recon_api.balance(account))["balance"] == "0.00"

    runs = await asyncio.gather(*(reconcile_payments(recon_ctx, sdk, grace=NOW, source="test") for _ in range(4)))
    assert mentions(runs, CREDITED, pi) == 1
    assert await purchase_entries(recon_engine, pi) == 1
    assert await fulfilment_source(recon_engine, pi) == "reconciler:test"
    balance = await recon_api.balance(account)
    assert (balance["balance"], balance["total_credits"]) == ("20.00", "20.00")
    r = await recon_client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)
    assert r.json()["status"] == "succeeded" and r.json()["lot"]["remaining"] == "20.00"

    # every run is recorded, with its window and counts
    async with recon_engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT credited, window_start, window_end, findings FROM reconcile_runs WHERE id = ANY(:ids)"),
                {"ids": [run.id for run in runs]},
            )
        ).all()
    assert sorted(row.credited for row in rows)[-1] >= 1 and len(rows) == 4
    assert sum(1 for row in rows for f in row.findings if f["payment_intent"] == pi and f["kind"] == CREDITED) == 1
    assert all(row.window_end - row.window_start == timedelta(hours=72) for row in rows)

    # the next run finds it credited; a ticket for it answers already_credited and moves nothing
    again = await reconcile_payments(recon_ctx, sdk, grace=NOW)
    assert mentions([again], CREDITED, pi) == 0 and again.already_credited >= 1
    r = await recon_client.post(
        "/v1/support_tickets", json={"account": account, "payment_intent": pi}, headers={**ADMIN, **key()}
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "already_credited" and r.json()["purchase"] == purchase["id"]
    assert (await recon_api.balance(account))["balance"] == "20.00"
    assert await purchase_entries(recon_engine, pi) == 1

    # the runs, read back by support and finance
    [winner] = [run for run in runs if mentions([run], CREDITED, pi)]
    r = await recon_client.get(f"/v1/reconciliation_runs/{winner.public_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    shown = r.json()
    assert (shown["object"], shown["source"], shown["credited"]) == ("reconciliation_run", "test", winner.credited)
    [finding] = [f for f in shown["findings"] if f["payment_intent"] == pi]
    assert (finding["kind"], finding["purchase"]) == (CREDITED, purchase["id"]) and finding["entry"].startswith("je_")
    listed = (await recon_client.get("/v1/reconciliation_runs", params={"limit": 100}, headers=ADMIN)).json()
    assert {run.public_id for run in [*runs, again]} <= {x["id"] for x in listed["data"]}
    own = await recon_api.token(["account"], account)
    assert (await recon_client.get("/v1/reconciliation_runs", headers=own)).status_code == 403
    r = await recon_client.get("/v1/reconciliation_runs/recon_999999999", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "reconciliation_run_not_found"


async def test_a_payment_found_late_keeps_its_time_for_the_refund_window_and_the_lot(
    recon_ctx: Context, recon_api: Api, recon_client: AsyncTestClient, recon_stripe: str,
    sdk: stripe.StripeClient, clock_at: Any,
) -> None:  # fmt: skip
    """A payment whose webhook was lost, found by the reconciler 30 hours later: its refund window (24 hours)
    and its credits' lifetime (a year) run from the payment (its successful charge's time at Stripe), not from
    the run that credited it (SPEC §5)."""
    account, purchase = await paid_without_webhook(recon_api, recon_client, recon_stripe, "10.00")
    pi = sdk.v1.payment_intents.retrieve(purchase["payment_intent"], {"expand": ["latest_charge"]})
    created = datetime.fromtimestamp(pi.latest_charge.created, UTC)  # type: ignore[union-attr]
    found = await retrieve_payment(sdk, purchase["payment_intent"])
    assert found is not None and found.paid == created  # the charge itself read back, not only its id
    since = created - timedelta(minutes=1)
    listed = [p.paid async for p in payments_since(sdk, recon_ctx.settings, since) if p.id == pi.id]
    assert listed == [created]
    clock_at(created + timedelta(hours=30))
    run = await reconcile_payments(recon_ctx, sdk, grace=NOW, source="test")
    assert mentions([run], CREDITED, purchase["payment_intent"]) == 1
    credited = (await recon_client.get(f"/v1/purchases/{purchase['id']}", headers=ADMIN)).json()
    assert datetime.fromisoformat(credited["paid_at"]) == created
    lots = (await recon_client.get(f"/v1/accounts/{account}/lots", headers=ADMIN)).json()["data"]
    assert [datetime.fromisoformat(lot["expires_at"]) for lot in lots] == [created + timedelta(days=365)]
    r = await recon_client.post(
        f"/v1/purchases/{purchase['id']}/refunds", json={"reason": "test"}, headers={**ADMIN, **key()}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "refund_window_closed", r.text
    assert (await recon_api.balance(account))["balance"] == "10.00"


async def test_credits_stripe_does_not_show_as_paid_and_other_amounts_are_reported_not_edited(
    recon_ctx: Context, recon_api: Api, recon_client: AsyncTestClient, recon_stripe: str, sdk: stripe.StripeClient
) -> None:
    # credited by a (forged, correctly signed) event while Stripe never took the money
    account = (await recon_api.account())["id"]
    unpaid = (await buy(recon_client, account, "10.00"))["purchase"]
    await pay(recon_client, unpaid)
    # credited for the purchase's total, while Stripe received another amount
    other = (await recon_api.account())["id"]
    changed = (await buy(recon_client, other, "10.00"))["purchase"]
    await pay(recon_client, changed)
    await sdk.v1.payment_intents.update_async(changed["payment_intent"], {"amount": 1200})
    await pay_at_emulator(recon_stripe, changed["payment_intent"])

    run = await reconcile_payments(recon_ctx, sdk, grace=NOW)

    [found] = [f for f in run.findings if f.payment_intent == unpaid["payment_intent"]]
    assert found.kind == UNPAID_CREDIT and "requires_payment_method" in found.detail
    [found] = [f for f in run.findings if f.payment_intent == changed["payment_intent"]]
    assert found.kind == AMOUNT_MISMATCH and "credited for 1080 cents" in found.detail and "1200" in found.detail
    assert run.unpaid_credits >= 1 and run.amount_mismatches >= 1
    # reported only: the ledger keeps what it booked
    assert (await recon_api.balance(account))["balance"] == "10.00"
    assert (await recon_api.balance(other))["balance"] == "10.00"


async def test_two_workers_running_the_job_at_once_credit_the_lost_payment_once(
    recon_settings: Settings, recon_api: Api, recon_client: AsyncTestClient, recon_stripe: str,
    recon_engine: AsyncEngine,
) -> None:  # fmt: skip
    account, purchase = await paid_without_webhook(recon_api, recon_client, recon_stripe, "30.00")
    pi = purchase["payment_intent"]
    async with recon_engine.connect() as conn:
        before = int(await conn.scalar(text("SELECT coalesce(max(id), 0) FROM reconcile_runs")) or 0)
    env = {
        "STRIPE_API_KEY": recon_settings.stripe_api_key or "",
        "STRIPE_API_BASE": recon_stripe,
        "BILLING_RECONCILE_GRACE": "0",
    }
    with (
        running_worker(recon_settings, "--threads", "2", **env),
        running_worker(recon_settings, "--threads", "2", **env),
    ):
        broker = raw_broker(recon_settings)
        for _ in range(4):
            send(broker, "reconcile_payments")

        async def four_runs() -> bool:
            async with recon_engine.connect() as conn:
                return bool(
                    await conn.scalar(text("SELECT count(*) >= 4 FROM reconcile_runs WHERE id > :id"), {"id": before})
                )

        await eventually(four_runs, "four reconciler runs")
    async with recon_engine.connect() as conn:
        rows = (
            await conn.execute(text("SELECT source, findings FROM reconcile_runs WHERE id > :id"), {"id": before})
        ).all()
    assert {row.source for row in rows} == {"scheduled"}
    assert sum(1 for row in rows for f in row.findings if f["payment_intent"] == pi and f["kind"] == CREDITED) == 1
    assert await purchase_entries(recon_engine, pi) == 1
    assert await fulfilment_source(recon_engine, pi) == "reconciler:scheduled"
    assert (await recon_api.balance(account))["balance"] == "30.00"


async def test_billing_reconcile_on_demand_credits_and_prints_the_run(
    recon_settings: Settings, recon_api: Api, recon_client: AsyncTestClient, recon_stripe: str,
    recon_engine: AsyncEngine,
) -> None:  # fmt: skip
    account, purchase = await paid_without_webhook(recon_api, recon_client, recon_stripe, "7.00")
    env = worker_env(recon_settings, STRIPE_API_KEY=recon_settings.stripe_api_key or "", STRIPE_API_BASE=recon_stripe)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", "reconcile", "--window-hours", "1", "--grace-seconds", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 120
    assert f"credited  {purchase['payment_intent']}" in done.stdout
    assert "since" in done.stdout and "credited now" in done.stdout
    assert (await recon_api.balance(account))["balance"] == "7.00"
    async with recon_engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT source, window_end - window_start AS span FROM reconcile_runs ORDER BY id DESC LIMIT 1")
            )
        ).one()
    assert (row.source, row.span) == ("cli", timedelta(hours=1))

    bad = subprocess.run(
        [sys.executable, "-m", "billing.cli", "reconcile", "--window-hours", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--window-hours" in bad.stderr


async def test_the_scheduler_sends_the_reconciler_on_its_interval(recon_settings: Settings) -> None:
    settings = replace(recon_settings, queue_namespace=f"{recon_settings.queue_namespace}_sched")
    client = raw_broker(settings).client
    queue = f"{settings.queue_namespace}:default"
    only_reconcile = {
        "BILLING_HOLD_EXPIRY_EVERY": "0",
        "BILLING_CREDIT_EXPIRY_EVERY": "0",
        "BILLING_VERIFY_EVERY": "0",
        "BILLING_RECONCILE_EVERY": "1",
        "BILLING_BYOK_RECONCILE_EVERY": "0",
        "BILLING_AUTO_TOPUP_EVERY": "0",
    }
    scheduler = billing("scheduler", env=worker_env(settings, **only_reconcile))
    try:

        async def two_slots() -> bool:
            assert scheduler.poll() is None, "the scheduler exited"
            waiting = client.llen(queue)
            assert isinstance(waiting, int)
            return waiting >= 2

        await eventually(two_slots, "the scheduler to send reconcile_payments twice")
    finally:
        stop(scheduler)
        sent = client.hvals(f"{queue}.msgs")
        assert isinstance(sent, list)
        messages = [dramatiq.Message.decode(m) for m in sent]
        for key in client.scan_iter(match=f"{settings.queue_namespace}:*"):
            client.delete(key)
    assert {m.actor_name for m in messages} == {"reconcile_payments"}


def test_a_payment_is_dated_by_its_successful_charge_and_else_by_its_payment_intent() -> None:
    """What the reconciler and support tickets credit a payment with as its time: the charge that paid it, as
    the webhook path dates it by its event (sent as the charge succeeds), so the refund window and the lot's
    lifetime do not depend on which path credited it; the PaymentIntent's creation (earlier: a checkout may be
    paid long after it began) only when the charge is not shown."""
    from billing.reconcile.stripe_payments import payment_of

    created, charged = 1_800_000_000, 1_800_001_800  # the customer paid half an hour after the checkout began
    pi = {"id": "pi_1", "status": "succeeded", "amount": 1000, "amount_received": 1000, "currency": "usd"}
    paid = payment_of({**pi, "created": created, "latest_charge": {"status": "succeeded", "created": charged}})
    assert paid.to_fulfil("test").paid_at == datetime.fromtimestamp(charged, UTC)
    for unseen in ("ch_1", {"status": "failed", "created": charged}, None):  # not expanded, not the payment, none
        payment = payment_of({**pi, "created": created, "latest_charge": unseen})
        assert payment.to_fulfil("test").paid_at == datetime.fromtimestamp(created, UTC), unseen
