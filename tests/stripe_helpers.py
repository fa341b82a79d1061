"""Stripe in tests: the local emulator, events signed with Stripe's real scheme, and a wider snapshot.

Events localstripe does not send (Checkout Sessions, crafted duplicates) are built here and signed the
way Stripe signs: `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import stripe
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import clock
from billing.stripe_client import LOCAL_API_KEY
from tests.conftest import ROOT, snapshot

WEBHOOK_SECRET = "whsec_test_" + uuid.uuid4().hex
# Stripe that never answers (nothing listens there): the outcome of a call is unknown.
UNREACHABLE = stripe.StripeClient(
    "sk_test_unreachable", base_addresses={"api": "http://127.0.0.1:9"}, max_network_retries=0
)
PURCHASE_TABLES = ("purchases", "fulfilments", "stripe_events")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def start_localstripe() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "billing.localstripe", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:  # readiness polled with a deadline
            assert process.poll() is None, "localstripe exited during start-up"
            try:
                r = httpx.get(f"{base}/v1/payment_intents", auth=(LOCAL_API_KEY, ""), timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "localstripe did not start in 30 s"
            time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(type_: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
    body = {
        "id": event_id or f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": int(clock.now().timestamp()),  # Stripe's clock is the service's (tests move it)
        "livemode": False,
        "type": type_,
        "data": {"object": obj},
    }
    return json.dumps(body).encode()


def payment_intent(pi: str, amount_cents: int, purchase_id: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": pi,
        "object": "payment_intent",
        "amount": amount_cents,
        "amount_received": amount_cents,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {"purchase_id": purchase_id} if purchase_id else {},
        **extra,
    }


def checkout_session(
    pi: str | None, amount_cents: int, purchase_id: str, payment_status: str = "paid"
) -> dict[str, Any]:
    return {
        "id": f"cs_test_{uuid.uuid4().hex[:24]}",
        "object": "checkout.session",
        "mode": "payment",
        "payment_intent": pi,
        "payment_status": payment_status,
        "amount_total": amount_cents,
        "currency": "usd",
        "client_reference_id": purchase_id,
        "metadata": {"purchase_id": purchase_id},
    }


def signed_headers(payload: bytes, **kwargs: Any) -> dict[str, str]:
    return {"Stripe-Signature": sign(payload, **kwargs), "Content-Type": "application/json"}


async def full_snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """`tests.conftest.snapshot` plus the purchase tables and every purchase's status."""
    snap = await snapshot(engine)
    async with engine.connect() as conn:
        for table in PURCHASE_TABLES:
            snap["counts"][table] = await conn.scalar(text(f"SELECT count(*) FROM {table}"))
        snap["purchases"] = (
            await conn.execute(text("SELECT string_agg(public_id || ':' || status, ',' ORDER BY id) FROM purchases"))
        ).scalar()
    return snap


async def pay_at_emulator(api_base: str, payment_intent: str, number: str = "4242424242424242") -> None:
    """What Stripe.js does in the browser: a card, attached to the PaymentIntent, confirmed (SDK → emulator)."""
    from billing.settings import Settings
    from billing.stripe_client import make_stripe

    sdk = make_stripe(Settings(stripe_api_key=LOCAL_API_KEY, stripe_api_base=api_base))
    assert sdk is not None
    card = {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await sdk.v1.payment_methods.create_async({"type": "card", "card": card})  # type: ignore[typeddict-item]
    await sdk.v1.payment_intents.update_async(payment_intent, {"payment_method": method.id})
    await sdk.v1.payment_intents.confirm_async(payment_intent)
