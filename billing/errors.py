"""One error shape everywhere: {"error": {"type", "code", "message", ...}} (SPEC §7).

Every refusal code maps to exactly one HTTP status here, so a code means the same thing on every route.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg

from billing.ledger import outcomes
from billing.ledger.money import MoneyError
from billing.ledger.outcomes import Refused

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
IDEMPOTENCY = "idempotency_error"
LEDGER = "ledger_error"
API = "api_error"

# Ledger refusals: code -> (status, type).
REFUSAL_STATUS: dict[str, tuple[int, str]] = {
    outcomes.AMOUNT_MUST_BE_POSITIVE: (400, INVALID_REQUEST),
    outcomes.AMOUNT_MUST_NOT_BE_ZERO: (400, INVALID_REQUEST),
    outcomes.EXPIRY_IN_PAST: (400, INVALID_REQUEST),
    outcomes.INSUFFICIENT_CREDITS: (402, LEDGER),
    outcomes.AMOUNT_NOT_WHOLE_CENTS: (400, INVALID_REQUEST),
    outcomes.PURCHASE_BELOW_MINIMUM: (400, INVALID_REQUEST),
    outcomes.PURCHASE_ABOVE_MAXIMUM: (400, INVALID_REQUEST),
    # A refund the purchase's state does not allow: stored like any outcome, so a retry answers the same.
    outcomes.PURCHASE_NOT_PAID: (409, INVALID_REQUEST),
    outcomes.CRYPTO_NOT_REFUNDABLE: (409, INVALID_REQUEST),
    outcomes.REFUND_WINDOW_CLOSED: (409, INVALID_REQUEST),
    outcomes.NOTHING_LEFT_TO_REFUND: (409, INVALID_REQUEST),
    outcomes.REFUND_EXCEEDS_REMAINING: (409, INVALID_REQUEST),
    outcomes.REFUND_FAILED: (409, INVALID_REQUEST),
}


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    type: str
    code: str
    message: str
    param: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(
        self, status: int, type_: str, code: str, message: str, param: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.param = param
        self.extra = extra

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param:
            error["param"] = self.param
        error.update(self.extra)
        return {"error": error}


def invalid(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(400, INVALID_REQUEST, code, message, param)


def internal_error() -> ApiError:
    """The answer to an unhandled error: the transaction it happened in was rolled back whole."""
    return ApiError(500, API, "internal_error", "Something went wrong on our side; nothing was half-done.")


# Text PostgreSQL cannot store: the NUL character, refused by psycopg before it sends a value (no SQLSTATE),
# and by the server inside JSON, as the escape \u0000 (untranslatable_character).
_NUL_IN_JSON = "22P05"


def unstorable_text(exc: BaseException) -> ApiError | None:
    """400 when `exc`, or an error that caused it, is the database refusing a NUL character the caller sent
    — always input, never a fault of ours — else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, psycopg.DataError) and (
            cause.sqlstate == _NUL_IN_JSON or (cause.sqlstate is None and "NUL" in str(cause))
        ):
            return invalid("unstorable_text", "Text must not contain the NUL character (\\u0000).")
        cause = cause.__cause__ or cause.__context__
    return None


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, INVALID_REQUEST, f"{what}_not_found", f"No {what.replace('_', ' ')} {ident!r}.")


def from_money(error: MoneyError, param: str) -> ApiError:
    return ApiError(400, INVALID_REQUEST, error.code, error.message, param)


def from_refusal(refused: Refused) -> ApiError:
    status, type_ = REFUSAL_STATUS[refused.code]
    return ApiError(status, type_, refused.code, refused.message, **refused.details)
