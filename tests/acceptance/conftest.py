"""The service as it runs in production: `billing serve` (uvicorn) in its own process, driven over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(database_url: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`billing serve` on a free port, once ready: its process and base URL. Stopped on the way out (if
    the test has not killed it already)."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_PORT": str(port),
        "BILLING_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([sys.executable, "-m", "billing.cli", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:  # readiness polling with a deadline, not a timing assumption
            assert process.poll() is None, "billing serve exited during start-up"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "billing serve did not become ready in 60 s"
            time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="session")
def live_url(database_url: str) -> Iterator[str]:
    with serving(database_url) as (_, base):
        yield base


async def funded_with_gateway(http: httpx.AsyncClient, amount: str) -> tuple[str, dict[str, str]]:
    """With an admin client: a new account granted `amount`, and the headers of a new gateway token."""
    account = (await http.post("/v1/accounts", json={"external_id": f"c_{uuid.uuid4().hex}"})).json()["id"]
    r = await http.post(
        f"/v1/accounts/{account}/grants",
        json={"amount": amount, "reason": "load"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 201
    token = (await http.post("/v1/tokens", json={"name": "gw", "scopes": ["gateway"]})).json()["secret"]
    return account, {"Authorization": f"Bearer {token}"}
