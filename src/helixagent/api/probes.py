"""Probes for orchestrators and load balancers, beside ``/health``; no key is needed and no secret shown.

* ``GET /livez``: 200 ``{"status": "ok"}`` whenever the process serves HTTP at all.
* ``GET /readyz``: 200 when every check passes, else 503 with the failing checks named:

  - ``providers``: at least one enabled provider;
  - ``database``: the record writer reaches the database, or its spool takes the records meanwhile
    (``spooling`` is ready; a failing spool is not);
  - ``redis``: every Redis in use (``redis.url``, the Redis cache, the Redis rate limits) answers PING
    within its configured timeout (at most 1 s);
  - ``draining``: false until SIGTERM (api/server.py calls :func:`start_draining`);
  - ``database_replica`` (only with ``database.read_url``; never fails readiness): ``ok``, or
    ``unavailable (...)`` while the reports read from the primary instead (store/replica.py).

The result is cached for :data:`CACHE_SECONDS` and computed by one task at a time, so probes at any rate
cost one PING per Redis per second at most, and a dead Redis delays an answer by its timeout at most.
Draining is answered at once, without the cache.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from ..gateway_types import GatewayLike
from .http import Request, send_json

CACHE_SECONDS = 1.0
_REDIS_TIMEOUT_CAP = 1.0

_draining = False


def start_draining() -> None:
    """From here on this process reports not ready (signal-handler safe: sets a flag)."""
    global _draining
    _draining = True


def is_draining() -> bool:
    return _draining


class Readiness:
    def __init__(self, gw: GatewayLike) -> None:
        self.gw = gw
        self._at = 0.0
        self._result: tuple[bool, dict[str, Any]] | None = None
        self._task: asyncio.Task[tuple[bool, dict[str, Any]]] | None = None
        self._clients: dict[str, Any] = {}
        cfg = gw.cfg
        urls: dict[str, float] = {}

        def use(url: str | None, timeout: float) -> None:
            if url:
                urls[url] = min(urls.get(url, _REDIS_TIMEOUT_CAP), timeout, _REDIS_TIMEOUT_CAP)
        use(cfg.redis.url, _REDIS_TIMEOUT_CAP)
        if cfg.cache.enabled and cfg.cache.type == "redis":
            use(cfg.cache.redis_url, cfg.cache.redis_timeout)
        if cfg.rate_limits.backend == "redis":
            use(cfg.rate_limits.redis_url, cfg.rate_limits.redis_timeout)
        self.redis_urls = urls

    async def check(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        if self._result is not None and now - self._at < CACHE_SECONDS:
            return self._result
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._compute())
        # shielded: a probe client that goes away does not cancel the check the others wait for
        result = await asyncio.shield(self._task)
        return result

    async def _compute(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        failing: list[str] = []
        gw = self.gw
        ok = any(p.cfg.enabled for p in gw.providers.values())
        checks["providers"] = "ok" if ok else "no enabled provider"
        if not ok:
            failing.append("providers")
        records = gw.services.get("records")
        if records is not None:
            w = records.writer
            if w.db_ok:
                checks["database"] = "ok"
            elif not w.memory_only:  # memory_only: records the spool (journal) could not take
                checks["database"] = "spooling"
            else:
                checks["database"] = "unreachable, and the spool is failing"
                failing.append("database")
            reads = getattr(records, "reads", None)
            if reads is not None and reads.replica is not None:
                # a detail, not a failure: the reports fall back to the primary meanwhile
                checks["database_replica"] = await reads.probe(_REDIS_TIMEOUT_CAP)
        if self.redis_urls:
            results = await asyncio.gather(*(self._ping(i, url, t)
                                             for i, (url, t) in enumerate(self.redis_urls.items())))
            bad = [r for r in results if r is not None]
            checks["redis"] = "ok" if not bad else "; ".join(bad)
            if bad:
                failing.append("redis")
        result = (not failing, {"checks": checks, "failing": failing})
        self._result = result
        self._at = time.monotonic()
        return result

    async def _ping(self, i: int, url: str, timeout: float) -> str | None:
        from ..redis_client import OUTAGE, PoolExhausted, make_client
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = make_client(url, pool_size=2, pool_timeout=timeout, timeout=timeout,
                                                      connect_timeout=timeout)
        try:
            await asyncio.wait_for(client.ping(), timeout)
        except (asyncio.TimeoutError, PoolExhausted):
            return f"redis #{i + 1}: no answer within {timeout:g}s"
        except OUTAGE as exc:  # the URL is not shown: it may hold a password
            return f"redis #{i + 1}: unreachable ({type(exc).__name__})"
        return None

    async def close(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()


async def livez(gw: GatewayLike, req: Request) -> None:
    await send_json(req.send, 200, {"status": "ok"})


def install(gw: GatewayLike) -> None:
    readiness = Readiness(gw)
    gw.services["readiness"] = readiness

    async def readyz(gw: GatewayLike, req: Request) -> None:
        if _draining:
            await send_json(req.send, 503, {"status": "not_ready", "failing": ["draining"],
                                            "checks": {"draining": True}})
            return
        ok, body = await readiness.check()
        body = {"status": "ready" if ok else "not_ready", **body}
        body["checks"] = {**body["checks"], "draining": False}
        await send_json(req.send, 200 if ok else 503, body)

    gw.route("GET", "/livez", livez)
    gw.route("GET", "/readyz", readyz)
    gw.on_shutdown(readiness.close)
