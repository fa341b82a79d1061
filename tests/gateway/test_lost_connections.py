"""The database drops every hot-path connection at once (a restart, a failover): the next calls still
answer, each charge lands once, and the dead connections are never handed out again.

(The test client serves the app on an event loop of its own, in another thread; the app's connections
are made and used there, through its portal, as the server would on its one loop.)"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.db import pipeline
from tests.conftest import Api, open_idle, terminate_backends
from tests.gateway.conftest import Gateway, funded


async def test_charges_after_the_server_dropped_every_connection_land_once(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Any, engine: AsyncEngine
) -> None:
    account = await funded(api, "1.00")
    pids = client.blocking_portal.call(open_idle, client_ctx.db, 4)
    hot = pipeline.connections(client_ctx.db)
    assert {pg.info.backend_pid for pg in hot.idle} >= set(pids)
    await terminate_backends(engine, pids)

    answers = await asyncio.gather(*(gw.charge(account=account, cost="0.10", expect=None) for _ in range(5)))
    assert [r.status_code for r in answers] == [201] * 5, [r.text for r in answers]
    assert (await api.balance(account))["balance"] == "0.50"
    assert not {pg.info.backend_pid for pg in hot.idle} & set(pids)  # none of the dead ones kept
