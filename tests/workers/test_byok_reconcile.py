"""The BYOK fee reconciliation as the workers and the CLI run it, on the jobs' own database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from decimal import Decimal
from types import ModuleType

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import clock
from billing.settings import Settings
from tests.conftest import ADMIN, ROOT, Api
from tests.gateway.conftest import Gateway
from tests.workers.conftest import eventually, worker_env


async def test_the_actor_corrects_this_months_wrong_fee_and_the_cli_then_finds_nothing(
    actors: ModuleType,
    worker: subprocess.Popen[bytes],
    jobs_api: Api,
    jobs_client: AsyncTestClient,
    jobs_engine: AsyncEngine,
    jobs_settings: Settings,
) -> None:
    r = await jobs_client.post(
        "/v1/accounts", json={"external_id": f"byok_{uuid.uuid4().hex}"}, headers=ADMIN
    )  # fmt: skip
    account = r.json()["id"]
    await jobs_api.grant(account, "100.00")
    gw = Gateway(jobs_client, await jobs_api.token(["gateway"]))
    for cost in ["9000.00", "9000.00", "7000.00"]:
        await gw.charge(account=account, is_byok=True, byok_list_cost=cost, upstream_inference_cost=cost)
    async with jobs_engine.begin() as conn:  # a lost counter: the next fee is charged as if inside the allowance
        await conn.execute(
            text("UPDATE byok_months SET list_usage = 0 WHERE account_id = (SELECT id FROM accounts WHERE public_id = :p)"),
            {"p": account},
        )  # fmt: skip
    charged = await gw.charge(account=account, is_byok=True, byok_list_cost="20.00", upstream_inference_cost="20.00")
    assert charged.json()["byok_fee"] == "0.00"  # 5% of 20 above the allowance = 1.00 is owed

    corrections = text(
        "SELECT c.amount FROM byok_corrections c JOIN accounts a ON a.id = c.account_id WHERE a.public_id = :p"
    )

    async def corrected() -> bool:
        async with jobs_engine.connect() as conn:
            return bool((await conn.execute(corrections, {"p": account})).all())

    actors.reconcile_byok_fees.send()
    await eventually(corrected, "the worker to correct the BYOK fee")
    assert (await jobs_api.balance(account))["balance"] == "99.00"

    month = clock.now().strftime("%Y-%m")
    env = worker_env(jobs_settings)
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", "byok-reconcile", "--month", month],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "0 correction(s)" in done.stderr + done.stdout
    async with jobs_engine.connect() as conn:
        assert (await conn.execute(corrections, {"p": account})).scalars().all() == [Decimal(1)]
    bad = subprocess.run(
        [sys.executable, "-m", "billing.cli", "byok-reconcile", "--month", month, "--close"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "has not ended" in bad.stderr
