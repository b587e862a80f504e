"""The pipeline stage: :class:`AuthStage` identifies and authorizes each request from its key header
(:func:`bearer_of`); :func:`install` builds the key store and the :class:`Authenticator`, and starts the
Redis key-change subscription (:func:`auth_redis_url`)."""
from __future__ import annotations

import logging

from ..config import Config
from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from .authenticator import Authenticator
from .keys import KeyStore

log = logging.getLogger("helixagent.auth")


def bearer_of(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None


_ACTIONS = {"embeddings": "embeddings"}


class AuthStage(Stage):
    name = "auth"

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def pre(self, ctx: RequestContext) -> bool:
        if ctx.identity is not None:
            # set by an internal caller, never from a request: the batch runner runs a line with the
            # identity of the batch's owner (batches/execute.py), re-checked against the key store
            return False
        try:
            ctx.identity = await self.auth.authorize(bearer_of(ctx.headers),
                                                     _ACTIONS.get(ctx.endpoint, "completions"))
        except GatewayError as exc:
            if exc.status == 401:
                # an unauthenticated caller's body is not kept, neither in memory nor in its record (which
                # still says who was turned away and why): anyone could fill the records with it
                ctx.raw_body = b""
            raise
        return False


def auth_redis_url(cfg: Config) -> str | None:
    if cfg.auth.redis_url:
        return cfg.auth.redis_url
    if cfg.redis.url:
        return cfg.redis.url
    rl = cfg.rate_limits
    return rl.redis_url if rl.backend == "redis" else None


def install(gw: GatewayLike) -> None:
    from ..store.db import engine_for

    cfg = gw.cfg
    engine = engine_for(cfg.database, application_name="helixagent-keys")
    store = KeyStore(engine)
    auth = Authenticator(cfg.auth.master_key, store, ttl=cfg.auth.key_cache_ttl)
    gw.services["auth"] = auth
    gw.services["keys"] = store
    gw.add_stage(AuthStage(auth))

    from ..api import admin_routes
    admin_routes.install(gw)

    async def start() -> None:
        try:
            if not await store.has_table():
                log.error("the api_keys table does not exist in the database: run `helixagent migrate up` "
                          "(or set database.auto_migrate: true); virtual keys will not authenticate until then")
        except Exception as exc:  # noqa: BLE001 - start-up probe, logged; keys stay unusable (deny) until it works
            log.error("cannot prepare the api_keys table in %s (%s: %s); virtual keys will not authenticate "
                      "until the database is reachable", cfg.database.url.split("@")[-1], type(exc).__name__, exc)
        url = auth_redis_url(cfg)
        if url:
            from .bus import InvalidationBus
            auth.bus = InvalidationBus(url, cfg.auth.redis_prefix, auth.forget)
            await auth.bus.start()
        if auth.open:
            log.warning("no master key is configured (HELIXAGENT_API_KEY): only localhost is served; callers "
                        "without a virtual key act as admin")

    async def stop() -> None:
        if auth.bus is not None:
            await auth.bus.stop()
        await engine.dispose()

    gw.on_startup(start)
    gw.on_shutdown(stop)
