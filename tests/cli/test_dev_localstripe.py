"""`billing dev` runs the Stripe emulator on 127.0.0.1 when no STRIPE_API_KEY is set, and registers the
service's webhook with it (SPEC §8)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from billing.cli import dev_children, ensure_local_stripe, wait_ready
from billing.settings import Settings
from billing.stripe_client import LOCAL_API_KEY
from tests.conftest import ROOT
from tests.stripe_helpers import free_port

STRIPE_ENV = ("STRIPE_API_KEY", "STRIPE_API_BASE", "STRIPE_WEBHOOK_SECRET", "BILLING_LOCALSTRIPE_PORT")


@pytest.fixture(autouse=True)
def restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ensure_local_stripe` exports to os.environ (for the children): undo that after each test."""
    for name in STRIPE_ENV:
        monkeypatch.setenv(name, "placeholder")  # records the original value (or its absence) for undo
        monkeypatch.delenv(name)


def test_no_stripe_key_means_the_local_emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = free_port()
    monkeypatch.setenv("BILLING_LOCALSTRIPE_PORT", str(port))
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path))
    settings = ensure_local_stripe(Settings.from_env())
    assert settings.stripe_api_key == LOCAL_API_KEY
    assert settings.stripe_api_base == f"http://127.0.0.1:{port}"
    assert settings.stripe_webhook_secret and settings.stripe_webhook_secret.startswith("whsec_")
    children = dev_children(settings, "http://127.0.0.1:8000")
    # the emulator is up before the API; worker and scheduler start last
    assert [c.name for c in children] == ["localstripe", "api", "worker", "scheduler"]
    emulator = children[0]
    assert emulator.argv[emulator.argv.index("--host") + 1] == "127.0.0.1"

    # start it as `billing dev` does, and register the webhook with it
    process = subprocess.Popen(emulator.argv, cwd=ROOT, start_new_session=True)
    try:
        wait_ready(emulator, process, timeout=30)
        assert emulator.on_ready is not None
        emulator.on_ready()
        r = httpx.get(f"{settings.stripe_api_base}/v1/payment_intents", auth=(LOCAL_API_KEY, ""))
        assert r.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_real_stripe_key_starts_no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_API_KEY", "sk_live_example")
    monkeypatch.delenv("STRIPE_API_BASE", raising=False)
    settings = ensure_local_stripe(Settings.from_env())
    assert settings.stripe_api_key == "sk_live_example"
    assert [c.name for c in dev_children(settings, "http://127.0.0.1:8000")] == ["api", "worker", "scheduler"]
