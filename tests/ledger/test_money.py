from decimal import Decimal

import pytest

from billing.ledger.money import MoneyError, format_money, parse_money, quantize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.0000000375", "0.0000000375"),
        ("12.5", "12.50"),
        ("-3", "-3.00"),
        ("0.000000000001", "0.000000000001"),
    ],
)
def test_parses_exact_decimal_strings(raw: str, expected: str) -> None:
    assert format_money(parse_money(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (1.5, "money_must_be_string"),
        (2, "money_must_be_string"),
        (True, "money_must_be_string"),
        (None, "invalid_money"),
        ("NaN", "invalid_money"),
        ("Infinity", "invalid_money"),
        ("1e3", "invalid_money"),
        ("1E-5", "invalid_money"),
        ("+5", "invalid_money"),
        (" 5", "invalid_money"),
        ("5.", "invalid_money"),
        (".5", "invalid_money"),
        ("0x10", "invalid_money"),
        # The whole string must be the number: `re.match` with `$` let a final newline through.
        ("5.00\n", "invalid_money"),
        ("5\n", "invalid_money"),
        ("-1.5\n", "invalid_money"),
        ("0.0000000000001\n", "invalid_money"),
        ("1,000", "invalid_money"),
        ("0.0000000000001", "too_precise"),
        ("1000000000.01", "amount_too_large"),
        ("99999999999999999999", "invalid_money"),
    ],
)
def test_refuses_inexact_or_absurd_money(raw: object, code: str) -> None:
    with pytest.raises(MoneyError) as info:
        parse_money(raw)
    assert info.value.code == code


def test_quantize_never_rounds_silently() -> None:
    with pytest.raises(ArithmeticError):
        quantize(Decimal("0.0000000000005"))
    assert quantize(Decimal("-0")) == 0 and str(quantize(Decimal("-0"))) == "0E-12"
