"""API contract pieces shared by every domain: lists, ids, and money fields."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

import msgspec

from billing.errors import not_found

T = TypeVar("T")

# Money crosses the API as a decimal string; the description tells client authors why.
MoneyStr = Annotated[
    str,
    msgspec.Meta(
        description='US dollars as a decimal string, at most 12 decimals, e.g. "12.50". JSON numbers are refused.',
        examples=["12.50"],
    ),
]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=1000, description="Why (kept in the audit log).")]


class ListOf(msgspec.Struct, Generic[T]):
    data: list[T]
    has_more: bool
    object: str = "list"


def public_id(prefix: str, internal: int) -> str:
    return f"{prefix}_{internal}"


def internal_id(prefix: str, public: str, what: str) -> int:
    """Parse `je_12` style ids; anything else is simply not found."""
    head, _, tail = public.partition("_")
    if head != prefix or not tail.isdigit() or len(tail) > 18:
        raise not_found(what, public)
    return int(tail)
