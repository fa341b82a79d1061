"""Named ways an operation can be refused by the ledger rules (TigerBeetle-style results).

The core raises `Refused(code)`; the HTTP layer maps each code to exactly one status (billing/errors.py),
and an idempotent retry replays the stored outcome, so a retry never ends differently from the first try.
"""

from __future__ import annotations

from typing import Any


class Refused(Exception):
    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


# Codes, in the order of precedence in which the builders check them.
AMOUNT_MUST_BE_POSITIVE = "amount_must_be_positive"
AMOUNT_MUST_NOT_BE_ZERO = "amount_must_not_be_zero"
EXPIRY_IN_PAST = "expiry_in_past"
INSUFFICIENT_CREDITS = "insufficient_credits"

# Purchases (billing/purchases/fees.py), in their order of precedence.
AMOUNT_NOT_WHOLE_CENTS = "amount_not_whole_cents"
PURCHASE_BELOW_MINIMUM = "purchase_below_minimum"
PURCHASE_ABOVE_MAXIMUM = "purchase_above_maximum"

# Refunds (billing/purchases/refunds.py), in their order of precedence.
PURCHASE_NOT_PAID = "purchase_not_paid"
CRYPTO_NOT_REFUNDABLE = "crypto_not_refundable"
REFUND_WINDOW_CLOSED = "refund_window_closed"
NOTHING_LEFT_TO_REFUND = "nothing_left_to_refund"
REFUND_EXCEEDS_REMAINING = "refund_exceeds_remaining"
# A retry whose first attempt's Stripe refund failed at Stripe before the ledger recorded it.
REFUND_FAILED = "refund_failed"
