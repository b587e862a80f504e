"""Which feature modules make up the gateway, in pipeline order.

Stages are entered in the order installed here (pre-hooks in order, post-hooks in reverse):
observability -> record -> auth -> limits -> cache -> [route -> provider]."""
from __future__ import annotations

from typing import Any


def install_features(gw: Any) -> None:
    from .api import openai_routes
    from . import auth

    openai_routes.install(gw)
    auth.install(gw)
    from .api import anthropic_routes; anthropic_routes.install(gw)  # noqa: E702  (after auth: /v1/messages)


def install_commands(subparsers: Any) -> None:
    """CLI subcommands contributed by feature modules (keys, migrate, usage, purge, ...)."""
