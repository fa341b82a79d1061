"""End to end, the way it runs: `billing serve` in its own process, the official SDK against the Stripe
emulator, and the emulator's own signed webhooks arriving over HTTP (SPEC §9)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import stripe

from billing.settings import Settings
from billing.stripe_client import LOCAL_API_KEY, make_stripe, register_local_webhook
from tests.conftest import ADMIN, ADMIN_TOKEN, ROOT
from tests.stripe_helpers import WEBHOOK_SECRET, free_port, signed_headers

DEADLINE_SECONDS = 30


@pytest.fixture(scope="module")
def live(database_url: str, localstripe: str) -> Iterator[str]:
    """`billing serve` configured for the emulator, with the emulator's webhook pointed at it."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_PORT": str(port),
        "BILLING_LOG_LEVEL": "WARNING",
        "STRIPE_API_KEY": LOCAL_API_KEY,
        "STRIPE_API_BASE": localstripe,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    process = subprocess.Popen([sys.executable, "-m", "billing.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, "billing serve exited during start-up"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "billing serve did not become ready in 60 s"
            time.sleep(0.1)
        register_local_webhook(localstripe, "billing-tests", f"{base}/v1/stripe/webhooks", WEBHOOK_SECRET)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
async def http(live: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live, headers=ADMIN, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(localstripe: str) -> stripe.StripeClient:
    client = make_stripe(Settings(stripe_api_key=LOCAL_API_KEY, stripe_api_base=localstripe))
    assert client is not None
    return client


async def new_purchase(http: httpx.AsyncClient, amount: str) -> tuple[str, dict[str, Any]]:
    r = await http.post("/v1/accounts", json={"external_id": f"user_{time.monotonic_ns()}"})
    acct = r.json()["id"]
    r = await http.post(
        f"/v1/accounts/{acct}/purchases",
        json={"amount": amount, "method": "card"},
        headers={"Idempotency-Key": f"buy-{time.monotonic_ns()}"},
    )
    assert r.status_code == 201, r.text
    return acct, r.json()


async def pay_with_card(sdk: stripe.StripeClient, payment_intent: str, number: str) -> None:
    """What Stripe.js does in the customer's browser, through the SDK against the emulator."""
    card = {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await sdk.v1.payment_methods.create_async({"type": "card", "card": card})  # type: ignore[typeddict-item]
    await sdk.v1.payment_intents.update_async(payment_intent, {"payment_method": method.id})
    await sdk.v1.payment_intents.confirm_async(payment_intent)


async def wait_for_status(http: httpx.AsyncClient, purchase: str, status: str) -> dict[str, Any]:
    """Poll until the webhook has arrived and been handled, with a deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        body = (await http.get(f"/v1/purchases/{purchase}")).json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"purchase still {body['status']!r}, not {status!r}, after the deadline"
        await asyncio.sleep(0.1)


async def test_test_card_payment_arrives_as_credits_once(
    http: httpx.AsyncClient, sdk: stripe.StripeClient, localstripe: str
) -> None:
    acct, created = await new_purchase(http, "14.55")
    purchase = created["purchase"]
    assert purchase["total"] == "15.35"
    await pay_with_card(sdk, purchase["payment_intent"], "4242424242424242")
    paid = await wait_for_status(http, purchase["id"], "succeeded")
    assert paid["lot"]["remaining"] == "14.55"
    balance = (await http.get(f"/v1/accounts/{acct}/balance")).json()
    assert (balance["balance"], balance["total_credits"]) == ("14.55", "14.55")

    # the emulator's own event, re-delivered 10 times in a row and 10 times at once: still credited once
    # (every page: the emulator lists oldest first, and other tests' payments come before this one)
    page = await sdk.v1.events.list_async({"type": "payment_intent.succeeded", "limit": 100})
    events = [e.to_dict() async for e in page.auto_paging_iter()]
    [original] = [e for e in events if e["data"]["object"]["id"] == purchase["payment_intent"]]
    payload = json.dumps(original).encode()
    for _ in range(10):
        r = await http.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
        assert r.status_code == 200 and r.json()["duplicate"] is True
    answers = await asyncio.gather(
        *(http.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload)) for _ in range(10))
    )
    assert [a.status_code for a in answers] == [200] * 10
    balance = (await http.get(f"/v1/accounts/{acct}/balance")).json()
    assert (balance["balance"], balance["total_credits"]) == ("14.55", "14.55")
    ledger = (await http.get(f"/v1/accounts/{acct}/ledger")).json()["data"]
    assert [line["kind"] for line in ledger] == ["purchase"]


async def test_declined_card_fails_the_purchase_and_credits_nothing(
    http: httpx.AsyncClient, sdk: stripe.StripeClient
) -> None:
    acct, created = await new_purchase(http, "25")
    purchase = created["purchase"]
    # localstripe declines at charge time with 4000000000000341 (its 4000000000000002 declines only when
    # attaching the card to a customer, which a one-off purchase does not do)
    with pytest.raises(stripe.CardError):
        await pay_with_card(sdk, purchase["payment_intent"], "4000000000000341")
    failed = await wait_for_status(http, purchase["id"], "failed")
    assert failed["failure_code"] == "card_declined" and failed["lot"] is None
    balance = (await http.get(f"/v1/accounts/{acct}/balance")).json()
    assert (balance["balance"], balance["total_credits"]) == ("0.00", "0.00")
    assert (await http.get(f"/v1/accounts/{acct}/ledger")).json()["data"] == []
