from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from billing.ledger.usage import MAX_TOKENS
from billing.schemas import ID_PATTERN, MoneyStr

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=ID_PATTERN)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
Label = Annotated[str, msgspec.Meta(max_length=200)]


class PricesIn(msgspec.Struct, forbid_unknown_fields=True):
    """USD per token (per request, per web-search result) as decimal strings."""

    prompt: MoneyStr = "0"
    completion: MoneyStr = "0"
    cache_read: MoneyStr = "0"
    cache_write: MoneyStr = "0"
    reasoning: MoneyStr = "0"
    request: MoneyStr = "0"
    web_search: MoneyStr = "0"


class UsageIn(msgspec.Struct, forbid_unknown_fields=True):
    prompt_tokens: Tokens = 0
    completion_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    web_search_results: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class Generation(msgspec.Struct, forbid_unknown_fields=True):
    """What a finished generation cost. Give `cost`, or `usage` + `prices` to have it computed exactly.
    BYOK generations give `byok_list_cost` (what it would have cost here) and `upstream_inference_cost`.
    """

    generation_id: Id
    cost: MoneyStr | None = None
    usage: UsageIn | None = None
    prices: PricesIn | None = None
    is_byok: bool = False
    byok_list_cost: MoneyStr | None = None
    upstream_inference_cost: MoneyStr | None = None
    model: Label | None = None
    provider: Label | None = None
    finish_reason: Label | None = None
    cancelled: bool = False
    streamed: bool = False


class CreateCharge(Generation, forbid_unknown_fields=True):
    """A one-shot charge for usage that was not held; `account` or `key` (or both) say who pays."""

    account: Id | None = None
    key: Id | None = None


class CreateHold(msgspec.Struct, forbid_unknown_fields=True):
    request_id: Id
    amount: MoneyStr
    account: Id | None = None
    key: Id | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 600


class Capture(Generation, forbid_unknown_fields=True):
    account: Id | None = None


class Release(msgspec.Struct, forbid_unknown_fields=True):
    account: Id | None = None


class GenerationOut(msgspec.Struct):
    """OpenRouter-compatible generation record (SPEC §6). `total_cost` is what credits paid."""

    id: str
    account: str
    key: str | None
    member: str | None
    hold: str | None
    total_cost: str
    usage: str
    upstream_inference_cost: str | None
    cache_discount: str | None
    is_byok: bool
    byok_list_cost: str | None
    byok_fee: str | None
    tokens_prompt: int
    tokens_completion: int
    native_tokens_reasoning: int
    native_tokens_cached: int
    model: str | None
    provider: str | None
    finish_reason: str | None
    cancelled: bool
    streamed: bool
    zero_completion_insured: bool
    created_at: datetime
    entry: str | None
    object: str = "generation"


class HoldOut(msgspec.Struct):
    id: str
    account: str
    key: str | None
    request_id: str
    amount: str
    status: str
    expires_at: datetime
    created_at: datetime
    object: str = "hold"


class CaptureOut(msgspec.Struct):
    hold: HoldOut
    generation: GenerationOut
    object: str = "capture"
