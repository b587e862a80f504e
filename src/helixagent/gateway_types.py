"""The gateway as the feature modules see it: the type of the ``gw`` every ``install(gw)`` and every route
handler ``async def handler(gw, req)`` receives.

A Protocol rather than ``app.Gateway`` itself, so a feature module depends on what it uses, not on app.py
(which imports every feature).  ``app.Gateway`` implements it; mypy checks that where the gateway passes
itself to a handler.  Shared services stay ``Any`` here (``gw.services["auth"]``): each is typed where it
is defined.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, TypeAlias

if TYPE_CHECKING:
    from .api.forwarded import ForwardedFor
    from .api.http import Request
    from .config import Config
    from .errors import GatewayError
    from .pipeline import Pipeline, Stage
    from .providers import Provider
    from .providers.fleet import Fleet
    from .redaction import SecretRegistry
    from .routing.router import Router

RouteHandler: TypeAlias = "Callable[[GatewayLike, Request], Awaitable[None]]"
PrefixHandler: TypeAlias = "Callable[[GatewayLike, Request, str], Awaitable[None]]"
# http_done(scope, status, started, error): the access log of requests outside the pipeline
HttpDone: TypeAlias = "Callable[[Any, int, float, GatewayError | None], None]"


class GatewayLike(Protocol):
    cfg: Config
    providers: dict[str, Provider]
    fleet: Fleet                      # the provider objects and the config entries they were built from
    config_path: str | None           # the config file a reload re-reads (None: built in-process)
    router: Router
    services: dict[str, Any]          # shared services (store, limiter, cache, metrics, auth, health...)
    routes: dict[tuple[str, str], RouteHandler]
    prefix_routes: list[tuple[str, str, PrefixHandler]]
    chat_pipeline: Pipeline
    embed_pipeline: Pipeline
    http_done: HttpDone | None
    started_at: float
    version: str
    mock_fallback: bool
    secrets: SecretRegistry           # every configured secret (redaction.py)
    forwarded: ForwardedFor | None    # client address from X-Forwarded-For (None: the peer)

    def route(self, method: str, path: str, handler: RouteHandler, pipeline: bool = False) -> None: ...

    def prefix_route(self, method: str, prefix: str, handler: PrefixHandler) -> None: ...

    async def authorize(self, req: Request, action: str) -> Any: ...

    def add_stage(self, stage: Stage) -> None: ...

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> None: ...

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None: ...
