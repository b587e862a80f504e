"""Routing: candidate selection, strategies, cost limits, retries, fallback, circuit breakers, hedging."""
from __future__ import annotations

from ..gateway_types import GatewayLike


def install(gw: GatewayLike) -> None:
    """Expose the router's health state as the ``health`` service (``/health``, availability metric)."""
    gw.services["health"] = gw.router.health
    gw.services["router"] = gw.router
