"""Helpers for buying credits in tests."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from tests.conftest import ADMIN, Api, key
from tests.stripe_helpers import event, payment_intent, signed_headers

# Tests that add a pricing version each get their own stretch of the far future (and move the service's
# clock there), so versions added by one test never price another test's purchases.
_epochs = itertools.count()


def future_epoch() -> datetime:
    return datetime(2400, 1, 1, tzinfo=UTC) + timedelta(days=1000 * next(_epochs))


async def buy(
    client: AsyncTestClient, account: str, amount: str, method: str = "card", headers: dict[str, str] = ADMIN
) -> dict[str, Any]:
    r = await client.post(
        f"/v1/accounts/{account}/purchases", json={"amount": amount, "method": method}, headers={**headers, **key()}
    )
    assert r.status_code == 201, r.text
    return r.json()


async def pay(client: AsyncTestClient, purchase: dict[str, Any]) -> dict[str, Any]:
    """Stripe reports the purchase's PaymentIntent as succeeded (a signed webhook to the in-process app)."""
    cents = int(purchase["total"].replace(".", ""))
    payload = event("payment_intent.succeeded", payment_intent(purchase["payment_intent"], cents, purchase["id"]))
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200, r.text
    return r.json()


async def spend(api: Api, client: AsyncTestClient, account: str, cost: str) -> None:
    """Usage as the gateway records it: a hold, then its capture."""
    gateway = await api.token(["gateway"])
    r = await client.post(
        "/v1/holds", json={"request_id": uuid.uuid4().hex, "account": account, "amount": cost}, headers=gateway
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/holds/{r.json()['id']}/capture", json={"generation_id": uuid.uuid4().hex, "cost": cost}, headers=gateway
    )
    assert r.status_code == 200, r.text
