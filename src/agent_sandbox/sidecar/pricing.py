"""The price table: the one place model prices live. Dollars per million tokens."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Price(BaseModel):
    """Prices of one model family in US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    """Uncached input tokens."""
    output: float = Field(ge=0)
    """Output tokens."""
    cache_write: float = Field(ge=0)
    """Input tokens written to the prompt cache (5-minute cache)."""
    cache_read: float = Field(ge=0)
    """Input tokens read from the prompt cache."""


def _p(inp: float, out: float) -> Price:
    return Price(input=inp, output=out, cache_write=inp * 1.25, cache_read=inp * 0.1)


# Matched by substring of the model name, first match wins, so specific names come before families.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-1": _p(15.0, 75.0),
    "claude-opus-4-0": _p(15.0, 75.0),
    "claude-opus-4-2025": _p(15.0, 75.0),
    "claude-3-opus": _p(15.0, 75.0),
    "opus": _p(5.0, 25.0),
    "sonnet": _p(3.0, 15.0),
    "claude-3-5-haiku": _p(0.8, 4.0),
    "claude-3-haiku": _p(0.25, 1.25),
    "haiku": _p(1.0, 5.0),
}

# An unknown model is billed at the highest known rate: a budget should err towards stopping early.
FALLBACK = Price(
    input=max(p.input for p in DEFAULT_PRICES.values()),
    output=max(p.output for p in DEFAULT_PRICES.values()),
    cache_write=max(p.cache_write for p in DEFAULT_PRICES.values()),
    cache_read=max(p.cache_read for p in DEFAULT_PRICES.values()),
)


def price_for(model: str, overrides: dict[str, Price] | None = None) -> Price:
    """The price of a model: the policy's overrides first, then the built-in table, then the fallback."""
    name = model.lower()
    for table in (overrides or {}, DEFAULT_PRICES):
        for key, price in table.items():
            if key.lower() in name:
                return price
    return FALLBACK


WEB_SEARCH_USD = 0.01
"""Price of one server-side web search ($10 per thousand), on top of its tokens."""
CACHE_WRITE_1H_FACTOR = 2.0
"""Writing to the 1-hour prompt cache costs twice the input price (the 5-minute cache: `cache_write`)."""


def cost_usd(
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read: int = 0,
    cache_write: int = 0,
    table: dict[str, Price] | None = None,
    *,
    cache_write_1h: int = 0,
    web_searches: int = 0,
) -> float:
    """What a call cost. `cache_write` counts every cache write; `cache_write_1h` says how many of them went
    to the 1-hour cache, which is billed at twice the input price instead of `cache_write`."""
    p = price_for(model, table)
    one_hour = min(cache_write_1h, cache_write)
    total = (
        input_tokens * p.input
        + output_tokens * p.output
        + cache_read * p.cache_read
        + (cache_write - one_hour) * p.cache_write
        + one_hour * p.input * CACHE_WRITE_1H_FACTOR
    )
    return total / 1_000_000 + web_searches * WEB_SEARCH_USD


def worst_case_usd(
    model: str,
    input_tokens: int,
    max_tokens: int,
    table: dict[str, Price] | None = None,
    *,
    one_hour_cache: bool = False,
    web_searches: int = 0,
) -> float:
    """The most a call can cost: every input token at the dearest input rate (uncached, or written to the
    cache), and `max_tokens` of output. Used by the gateway to reserve budget before it forwards a call."""
    p = price_for(model, table)
    in_rate = max(p.input, p.cache_write, p.input * CACHE_WRITE_1H_FACTOR if one_hour_cache else 0.0)
    return (input_tokens * in_rate + max_tokens * p.output) / 1_000_000 + web_searches * WEB_SEARCH_USD
