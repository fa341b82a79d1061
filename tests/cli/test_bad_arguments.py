"""An operational command answers an argument it cannot use with a `billing: …` message and a non-zero exit,
not a traceback: instants and months in the years 2000 to 9000 (UTC) like the API's timestamps, bounded
hours and seconds, and a revision Alembic does not know."""

from __future__ import annotations

import subprocess
import sys

import pytest

from billing.settings import Settings
from tests.conftest import ROOT
from tests.workers.conftest import worker_env

CASES = {
    "expire-as-of-beyond-9999-in-utc": ["expire", "--dry-run", "--as-of", "9999-12-31T23:59:59-05:00"],
    "expire-as-of-before-year-1-in-utc": ["expire", "--dry-run", "--as-of", "0001-01-01T00:00:00+01:00"],
    "expire-as-of-after-9000": ["expire", "--dry-run", "--as-of", "9001-01-01T00:00:00Z"],
    "byok-reconcile-month-9999-12": ["byok-reconcile", "--month", "9999-12"],
    "byok-reconcile-month-before-2000": ["byok-reconcile", "--month", "1999-12"],
    "reconcile-huge-window": ["reconcile", "--window-hours", "999999999"],
    "reconcile-no-window": ["reconcile", "--window-hours", "0"],
    "reconcile-huge-grace": ["reconcile", "--grace-seconds", "999999999999"],
    "migrate-unknown-revision": ["migrate", "--revision", "no_such_revision"],
}


@pytest.mark.parametrize("argv", list(CASES.values()), ids=list(CASES))
def test_a_bad_argument_is_a_message_and_an_exit_code_not_a_traceback(settings: Settings, argv: list[str]) -> None:
    env = worker_env(
        settings, STRIPE_API_KEY=settings.stripe_api_key or "", STRIPE_API_BASE=settings.stripe_api_base or ""
    )
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-800:]
    assert done.stderr.strip().splitlines()[-1].startswith("billing"), done.stderr[-800:]
