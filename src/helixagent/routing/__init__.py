"""Routing: candidate selection, strategies, cost limits, retries, fallback, circuit breakers, hedging."""
from __future__ import annotations

from ..gateway_types import GatewayLike


def install(gw: GatewayLike) -> None:
    """Expose the router's health state as the ``health`` service (``/health``, availability metric)."""
    gw.services["health"] = gw.router.health
    gw.services["router"] = gw.router


def install_priority(gw: GatewayLike) -> None:
    """The stage that sets each request's queue priority (priority.py); the queues are the router's."""
    from .priority import PriorityStage
    gw.add_stage(PriorityStage())
    gw.services["queues"] = gw.router.queues
