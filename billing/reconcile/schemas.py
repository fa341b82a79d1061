"""The reconciler's runs, as the API shows them (finance and support)."""

from __future__ import annotations

from datetime import datetime

import msgspec


class RunFinding(msgspec.Struct):
    kind: str  # credited | needs_review | unpaid_credit | amount_mismatch
    payment_intent: str
    detail: str
    purchase: str | None
    entry: str | None


class ReconciliationRun(msgspec.Struct):
    id: str
    source: str  # scheduled | cli
    started_at: datetime
    finished_at: datetime
    window_start: datetime
    window_end: datetime  # payments created after this were younger than the grace period
    seen: int
    young: int
    already_credited: int
    credited: int
    needs_review: int
    unpaid_credits: int
    amount_mismatches: int
    findings: list[RunFinding]
    object: str = "reconciliation_run"
