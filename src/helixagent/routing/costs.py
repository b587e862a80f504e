"""Prices for routing and limits: the shipped catalogue with the provider's ``model_prices`` applied, else
``providers[].model_prices`` alone (an override for a model the catalogue does not know).

``price(cfg, model)`` -> ``(input_per_token, output_per_token)`` in US dollars, or None when unknown.
Unknown prices never make routing skip a provider (a cost limit cannot be checked against an unknown
price) and give no ``x-helixagent-cost`` header.
"""
from __future__ import annotations

from ..canonical import Usage
from ..config import ProviderConfig
from ..providers import catalogue as _catalogue


def price(cfg: ProviderConfig, model: str) -> tuple[float, float] | None:
    p = _catalogue.price(cfg, model)
    if p is not None:
        return float(p[0] or 0.0), float(p[1] or 0.0)
    mp = cfg.model_prices.get(model)
    if mp is None or (mp.input_per_mtok is None and mp.output_per_mtok is None):
        return None
    return (mp.input_per_mtok or 0.0) / 1e6, (mp.output_per_mtok or 0.0) / 1e6


def cost_of(p: tuple[float, float] | None, prompt_tokens: int, completion_tokens: int) -> float | None:
    if p is None:
        return None
    return p[0] * prompt_tokens + p[1] * completion_tokens


def format_cost(cost: float) -> str:
    """Dollars with 10 decimals, trailing zeros removed: '0.00012', '0'."""
    s = f"{cost:.10f}".rstrip("0").rstrip(".")
    return s or "0"


def usage_cost(cfg: ProviderConfig, model: str, p: tuple[float, float] | None, usage: Usage | None) -> float | None:
    """The cost of a finished call from its real usage (cached prompt tokens at the catalogue's cache
    prices when it has them)."""
    if p is None or usage is None:
        return None
    if usage.cache_read_tokens or usage.cache_creation_tokens:
        c = _catalogue.estimate_cost(cfg, model, usage.prompt_tokens, usage.completion_tokens,
                                     usage.cache_read_tokens, usage.cache_creation_tokens)
        if c is not None:
            return c
    return p[0] * usage.prompt_tokens + p[1] * usage.completion_tokens
