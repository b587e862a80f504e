"""Routing: candidate selection, strategies, cost limits, retries, fallback, circuit breakers, hedging."""
from __future__ import annotations

from typing import Any


def install(gw: Any) -> None:
    """Expose the router's health state as the ``health`` service (``/health``, availability metric)."""
    gw.services["health"] = gw.router.health
    gw.services["router"] = gw.router
