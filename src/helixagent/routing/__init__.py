"""Routing: candidate selection, strategies, cost limits, retries, fallback, circuit breakers, hedging."""
from __future__ import annotations

from ..gateway_types import GatewayLike


def install(gw: GatewayLike) -> None:
    """Expose the router's health state as the ``health`` service (``/health``, availability metric);
    with ``routing.shared_health`` on, share it with the other instances through Redis."""
    gw.services["health"] = gw.router.health
    gw.services["router"] = gw.router
    sh = gw.cfg.routing.shared_health
    if sh.enabled and sh.redis_url:
        from .shared_health import SharedHealth
        router = gw.router

        def attempt_timeout(name: str) -> float:  # the running config's (a reload may change it)
            p = router.providers.get(name)
            return p.cfg.timeout_ms / 1000.0 if p is not None else 0.0

        shared = SharedHealth(router.health, sh.redis_url, sh.key_prefix or gw.cfg.auth.redis_prefix,
                              sh.sync_interval, sh.redis_timeout, attempt_timeout=attempt_timeout)
        gw.services["shared_health"] = shared
        gw.on_startup(shared.start)
        gw.on_shutdown(shared.stop)
