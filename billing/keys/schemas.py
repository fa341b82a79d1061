from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from billing.schemas import MoneyStr, StaffReason

Reset = Literal["daily", "weekly", "monthly"]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    limit: MoneyStr | None = None
    limit_reset: Reset | None = None
    include_byok_in_limit: bool = False
    expires_at: datetime | None = None
    member: Annotated[str | None, msgspec.Meta(description="For an organization: the member account using it.")] = None
    reason: StaffReason | None = None


class UpdateKey(msgspec.Struct, forbid_unknown_fields=True):
    """Only the fields sent change; send `"limit": null` to remove the limit."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    limit: MoneyStr | msgspec.UnsetType | None = msgspec.UNSET
    limit_reset: Reset | msgspec.UnsetType | None = msgspec.UNSET
    include_byok_in_limit: bool | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET
    expires_at: datetime | msgspec.UnsetType | None = msgspec.UNSET
    reason: StaffReason | msgspec.UnsetType = msgspec.UNSET  # not a change: what the audit log records with it


class Key(msgspec.Struct):
    """OpenRouter-compatible key view: limits and usage per period (UTC; weeks run Monday–Sunday)."""

    id: str
    account: str
    member: str | None
    name: str
    limit: str | None
    limit_remaining: str | None
    limit_reset: str | None
    include_byok_in_limit: bool
    usage: str
    usage_daily: str
    usage_weekly: str
    usage_monthly: str
    byok_usage: str
    byok_usage_daily: str
    byok_usage_weekly: str
    byok_usage_monthly: str
    is_free_tier: bool
    disabled: bool
    expires_at: datetime | None
    created_at: datetime
    object: str = "key"
