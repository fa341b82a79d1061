"""The organization-membership API contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from billing.schemas import StaffReason

Role = Annotated[
    Literal["admin", "member"],
    msgspec.Meta(description="`admin` may buy and refund credits for the organization; `member` spends through keys."),
]


class SetMember(msgspec.Struct, forbid_unknown_fields=True):
    member: Annotated[str, msgspec.Meta(min_length=1, max_length=100, description="A `user` account id.")]
    role: Role
    reason: StaffReason | None = None


class Member(msgspec.Struct):
    organization: str
    member: str
    role: str
    created_at: datetime
    deleted: bool = False
    object: str = "organization_member"
