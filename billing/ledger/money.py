"""Exact money: US dollars as `Decimal`, resolved to 1e-12 USD (SPEC §3).

A token can cost $0.0000000375, so prices × tokens must be exact at twelve decimals. Money crosses the
API only as a decimal string; JSON numbers are refused because a float has already lost exactness by
the time we would see it.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_EVEN, Context, Decimal

PLACES = 12
QUANTUM = Decimal(1).scaleb(-PLACES)  # 1e-12 USD
ZERO = Decimal(0).quantize(QUANTUM)
# No single money input may exceed this ($1 billion): far above any real request, far below NUMERIC(38,12).
MAX_INPUT = Decimal("1000000000")

# Plain decimal notation only: optional minus, digits, optional fraction of at most 12 digits. Both patterns
# are matched against the whole string (`fullmatch`): `$` alone also matches before a final newline.
_MONEY_RE = re.compile(r"-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,12})?")
_TOO_PRECISE_RE = re.compile(r"-?[0-9]*\.[0-9]{13,}")
# Wide enough for every intermediate product of price × tokens without rounding.
_EXACT = Context(prec=80)


class MoneyError(ValueError):
    """A money input that is not an exact, sane amount; `code` names what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_money(raw: object, *, field: str = "amount") -> Decimal:
    """Parse a decimal string into an exact amount at 1e-12 resolution, or raise `MoneyError`. The whole
    string is the number: no sign but `-`, no exponent, no surrounding whitespace, not even a final newline."""
    if isinstance(raw, (bool, int, float)):
        raise MoneyError(
            "money_must_be_string", f'`{field}` must be a decimal string such as "12.50", not a JSON number.'
        )
    if not isinstance(raw, str):
        raise MoneyError("invalid_money", f'`{field}` must be a decimal string such as "12.50".')
    if not _MONEY_RE.fullmatch(raw):
        if _TOO_PRECISE_RE.fullmatch(raw):
            raise MoneyError("too_precise", f"`{field}` has more than {PLACES} decimal places.")
        raise MoneyError(
            "invalid_money",
            f"`{field}` must be plain decimal notation (digits, optional '.', up to {PLACES} decimals); "
            f"got {raw[:40]!r}.",
        )
    value = Decimal(raw)
    if abs(value) > MAX_INPUT:
        raise MoneyError("amount_too_large", f"`{field}` exceeds the maximum of {MAX_INPUT} USD.")
    return quantize(value)


def quantize(value: Decimal) -> Decimal:
    """Bring an exact value to 12 places. Raises if that would round: rounding is never silent here.
    (The context is passed, not entered: `localcontext` doubled the cost of a call, several per charge.)"""
    q = value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=_EXACT)
    if q != value:
        raise ArithmeticError(f"{value} is not representable at 1e-12 USD without rounding")
    return _EXACT.plus(q)  # normalises -0 to 0


def format_money(value: Decimal) -> str:
    """Fixed-point string with at least two decimals and no trailing zeros beyond them."""
    if not value.is_finite():
        raise ArithmeticError("money must be finite")
    text = format(quantize(value), "f")
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    if len(frac) < 2:
        frac = frac.ljust(2, "0")
    if whole == "-0" and set(frac) == {"0"}:
        whole = "0"
    return f"{whole}.{frac}"
