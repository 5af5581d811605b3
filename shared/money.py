"""Prices: the API speaks USD per 1M tokens, storage and the wire speak integer nano-USD per token."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def usd_per_million_to_nano_per_token(value: str | int | float | Decimal) -> int:
    """Convert a USD-per-1M-tokens price to exact nano-USD per token.

    1 USD / 1M tokens is 1000 nano-USD per token, so any price with at most 6 decimals converts
    exactly; finer prices, negatives and non-numbers raise ``ValueError``.
    """
    try:
        usd = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"price {value!r} is not a number") from None
    if not usd.is_finite() or usd < 0:
        raise ValueError(f"price {value!r} must be a non-negative number")
    nano = usd * NANO_PER_USD / TOKENS_PER_PRICE_UNIT
    if nano != nano.to_integral_value():
        raise ValueError(f"price {value!r} has more precision than 0.000001 USD per 1M tokens")
    return int(nano)


def nano_per_token_to_usd_per_million(nano: int) -> float:
    """The display form of a per-token price (USD per 1M tokens)."""
    return float(Decimal(nano) * TOKENS_PER_PRICE_UNIT / NANO_PER_USD)


# A blended price weighs input and output tokens 3:1, a common mix for chat (long prompts, shorter
# replies): (3 * input + output) / 4. Kept in "blend units" (3 * input + output, nano-USD per 4
# tokens) where it must stay exact.
BLEND_INPUT, BLEND_OUTPUT = 3, 1


def blend_units(price_in: int, price_out: int) -> int:
    """3 * input + output, in nano-USD per token: four times the blended price, exactly."""
    return BLEND_INPUT * price_in + BLEND_OUTPUT * price_out


def blended_usd_per_million(units: int) -> float:
    """A blended price (from :func:`blend_units`) in USD per 1M tokens."""
    return float(Decimal(units) * TOKENS_PER_PRICE_UNIT / (NANO_PER_USD * (BLEND_INPUT + BLEND_OUTPUT)))


def nano_to_usd(nano: int) -> float:
    """Nano-USD as dollars, for the API's ``…Usd`` fields (exact sums are in the ``…Nano`` fields)."""
    return nano / NANO_PER_USD


def format_usd(nano: int) -> str:
    """Nano-USD as text: cents for large sums, more places for small ones, so that a request's cost
    of a fraction of a cent shows (and a balance moves when one is charged)."""
    value = nano / NANO_PER_USD
    if abs(value) >= 100 or value == 0:
        return f"${value:,.2f}"
    return f"${value:,.4f}" if abs(value) >= 0.01 else f"${value:.6f}"


def usd_to_nano(value: str | float | int, maximum: int) -> int:
    """Exact nano-USD for a positive amount of at most 9 decimals and at most ``maximum`` USD."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("must be a number") from None
    if not amount.is_finite() or amount <= 0 or amount > maximum:
        raise ValueError(f"must be more than 0 and at most {maximum}")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError("has more than 9 decimals")
    return int(nano)
