"""The free-model admission contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec


class CreateFreeRequest(msgspec.Struct, forbid_unknown_fields=True):
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=100, description="The account (`acct_...`).")]
    model: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=200,
            description="A free model id, ending in `:free`.",
            examples=["meta-llama/llama-3.3-70b-instruct:free"],
        ),
    ]
    key: Annotated[str, msgspec.Meta(max_length=100, description="The API key used (echoed back).")] | None = None


class QuotaWindow(msgspec.Struct):
    limit: int
    remaining: int
    reset_at: datetime


class FreeLimits(msgspec.Struct):
    per_minute: QuotaWindow
    per_day: QuotaWindow


class FreeRequest(msgspec.Struct):
    account: str
    model: str
    key: str | None
    allowed: bool
    limits: FreeLimits
    # True while Redis is unreachable: counted by this process alone (see docs/free-models.md).
    degraded: bool
    object: str = "free_request"
