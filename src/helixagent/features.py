"""Which feature modules make up the gateway, in pipeline order.

Stages are entered in the order installed here (pre-hooks in order, post-hooks in reverse):
observability -> record -> auth -> priority -> (Anthropic feature check) -> flags -> ensemble -> limits -> cache
-> [route -> provider].  The config reload (reload.py) is installed last: it reconfigures what the others built."""
from __future__ import annotations

from typing import Any

from .gateway_types import GatewayLike


def install_features(gw: GatewayLike) -> None:
    from . import auth, cache, flags, limits, reload, routing
    from .api import anthropic_routes, gemini_routes, openai_routes, probes, responses_routes
    from .batches import service as batches
    from .ensemble import service as ensemble
    from .observability import stage as observability
    from .store import record

    observability.install(gw)  # first: outermost stage, its post-hook runs last
    openai_routes.install(gw)
    probes.install(gw)  # /livez, /readyz (no key), beside /health
    record.install(gw)  # outer stage: records requests rejected by any later stage too
    auth.install(gw)
    routing.install_priority(gw)  # right after auth: the request's queue priority (a bad header is a 400)
    anthropic_routes.install(gw)  # after auth: /v1/messages and its provider-feature check
    responses_routes.install(gw)  # after auth: /v1/responses, its store and its native/translated check
    gemini_routes.install(gw)  # after auth: /v1beta/models/{model}:generateContent ... and its provider fit
    batches.install(gw)  # /v1/files, /v1/batches, /v1/messages/batches and the local batch runner
    flags.install(gw)  # feature flags: the streaming check; the cache and usage read the flags service
    ensemble.install(gw)  # after auth, before limits: the panel's worst case is what limits reserve
    limits.install(gw)
    cache.install(gw)  # the last stage before the router; wraps the router's handler for de-duplication
    routing.install(gw)
    reload.install(gw)  # SIGHUP / POST /admin/reload: re-reads the config and reconfigures the above


def install_commands(subparsers: Any) -> None:
    """CLI subcommands contributed by feature modules (keys, migrate, usage, purge, ...)."""
    from .auth import cli as auth_cli
    from .store import cli as store_cli

    auth_cli.install(subparsers)
    store_cli.install_commands(subparsers)
