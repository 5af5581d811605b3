"""Exact money arithmetic: USD prices and amounts to integer nano-USD, and what is refused."""

from __future__ import annotations

import pytest

from shared.money import usd_per_million_to_nano_per_token, usd_to_nano


@pytest.mark.parametrize(
    ("usd", "nano"), [("0", 0), ("1", 1000), ("0.05", 50), ("2.5", 2500), ("0.000001", 0), ("15", 15000)]
)
def test_price_conversion_is_exact(usd: str, nano: int) -> None:
    if usd == "0.000001":
        with pytest.raises(ValueError, match="precision"):
            usd_per_million_to_nano_per_token(usd)
    else:
        assert usd_per_million_to_nano_per_token(usd) == nano


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "inf"])
def test_bad_prices_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_per_million_to_nano_per_token(bad)


@pytest.mark.parametrize(
    ("value", "nano"), [("10", 10_000_000_000), (0.25, 250_000_000), ("0.000000001", 1), (3, 3_000_000_000)]
)
def test_usd_amounts_convert_exactly(value: object, nano: int) -> None:
    assert usd_to_nano(value, 1_000_000) == nano  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["abc", "-1", "0", "0.0000000001", "NaN", "Infinity", True, "1000001"])
def test_bad_usd_amounts_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        usd_to_nano(value, 1_000_000)  # type: ignore[arg-type]
