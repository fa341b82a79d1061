"""API contract pieces shared by every domain: lists, ids, money and timestamp fields."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Generic, TypeVar, overload

import msgspec

from billing.errors import from_money, invalid, not_found
from billing.ledger.money import MoneyError, format_money, parse_money

T = TypeVar("T")

# Money crosses the API as a decimal string; the description tells client authors why.
MoneyStr = Annotated[
    str,
    msgspec.Meta(
        description='US dollars as a decimal string, at most 12 decimals, e.g. "12.50". JSON numbers are refused.',
        examples=["12.50"],
    ),
]
REASON_MAX = 1000
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=REASON_MAX, description="Why (kept in the audit log).")]
# A reason that staff must give and an account's own token need not (billing.auth.audit.require_reason)
StaffReason = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=REASON_MAX,
        description="Why (kept in the audit log). Required when a support or admin token makes the change.",
    ),
]
# An id the caller chooses (generation, request, external id): printable ASCII, no spaces. `(?!\n)`: Python's
# `$` also matches before a final newline ("gen_1\n" would pass); the lookahead refuses it and reads the same
# in the JSON Schema (ECMA-262) the OpenAPI document publishes.
ID_PATTERN = r"^[\x21-\x7e]+$(?!\n)"


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


def money_field(
    raw: str | None,
    field: str,
    *,
    negative: str | None = "amount_must_not_be_negative",
    maximum: Decimal | None = None,
) -> Decimal | None:
    """One money field of a request, exact, or a 400 naming the field (SPEC §3). `negative` is the error
    code for a value below zero, or None where a signed amount is allowed."""
    if raw is None:
        return None
    try:
        value = parse_money(raw, field=field)
    except MoneyError as e:
        raise from_money(e, field) from e
    if negative is not None and value < 0:
        raise invalid(negative, f"`{field}` must not be negative.", field)
    if maximum is not None and value > maximum:
        raise invalid("amount_too_large", f"`{field}` exceeds {maximum} USD.", field)
    return value


def checked_reason(reason: str | None) -> str | None:
    """A `reason` given in a query (a DELETE has no body): 1 to REASON_MAX characters, as `Reason` in a body."""
    if reason is not None and not 1 <= len(reason) <= REASON_MAX:
        raise invalid("invalid_reason", f"`reason` is 1 to {REASON_MAX} characters.", "reason")
    return reason


def storable_text(raw: str | None, field: str) -> str | None:
    """A text field of a request, or a 400 `unstorable_text` naming it: PostgreSQL cannot store the NUL
    character. Checked up front where the write comes after something that cannot be undone (a Stripe call);
    elsewhere the database's own refusal is answered the same way (`errors.unstorable_text`)."""
    if raw is not None and "\x00" in raw:
        raise invalid("unstorable_text", f"`{field}` must not contain the NUL character (\\u0000).", field)
    return raw


def rate_field(raw: str, field: str, *, upto_one: bool) -> Decimal:
    """A fraction with at most 6 decimals (the rate columns' scale: a finer rate would be rounded by the
    database, silently), from 0 to 1 (or below 1)."""
    value = money_field(raw, field, negative=None)
    assert value is not None
    if value != value.quantize(Decimal("0.000001")):
        raise invalid("too_precise", f"`{field}` has more than 6 decimal places.", field)
    if value < 0 or value > 1 or (value == 1 and not upto_one):
        raise invalid("invalid_rate", f"`{field}` is a fraction from 0 to {'1' if upto_one else 'below 1'}.", field)
    return value


# The times a request may carry: the years 2000 to 9000, UTC. PostgreSQL stores times far beyond them, but
# Python's datetime cannot read back one past 9999-12-31 UTC ("9999-12-31T23:59:59-05:00" is year 10000 in
# UTC): stored, it would fail every later read of its row. 2000-01-01 is where the seeded rules begin.
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(9001, 1, 1, tzinfo=UTC)  # exclusive


@overload
def timestamp_field(value: datetime, field: str) -> datetime: ...
@overload
def timestamp_field(value: None, field: str) -> None: ...
def timestamp_field(value: datetime | None, field: str) -> datetime | None:
    """One timestamp of a request, in UTC (SPEC §7), or a 400 naming the field: it must carry a UTC offset
    (`timezone_required`) and fall in the years 2000 to 9000 in UTC (`invalid_parameter`), so that whatever
    is stored can be read back (SPEC §3: bad input gets a 4xx and changes nothing)."""
    if value is None:
        return None
    if value.utcoffset() is None:
        raise invalid("timezone_required", f"`{field}` must carry a UTC offset, e.g. 2027-01-01T00:00:00Z.", field)
    if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
        raise invalid("invalid_parameter", f"`{field}` must fall in the years 2000 to 9000 (UTC).", field)
    return value.astimezone(UTC)


def money_or_none(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None
