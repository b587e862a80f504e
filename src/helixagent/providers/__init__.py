"""Providers: one module per vendor wire format, all behind :class:`~helixagent.providers.base.Provider`."""
from __future__ import annotations

from ..config import HTTPConfig, ProviderConfig
from .base import Provider

_REGISTRY: dict[str, str] = {
    "openai": "helixagent.providers.openai:OpenAIProvider",
    "mock": "helixagent.providers.mock:MockProvider",
    "anthropic": "helixagent.providers.anthropic:AnthropicProvider",
    "gemini": "helixagent.providers.gemini:GeminiProvider",
}


def is_configured(cfg: ProviderConfig) -> bool:
    """Has what it needs to reach its upstream: a key, unless the server needs none."""
    return bool(cfg.api_key) or cfg.type in ("openai_compatible", "mock")


def build_provider(cfg: ProviderConfig, http: HTTPConfig) -> Provider:
    import importlib
    target = _REGISTRY.get(cfg.wire)
    if target is None:
        raise ValueError(f"provider {cfg.name!r}: no adapter for wire format {cfg.wire!r}")
    mod, _, cls = target.partition(":")
    # an in-repo module: failing to import it is a bug, reported as such (not as "unavailable")
    klass: type[Provider] = getattr(importlib.import_module(mod), cls)
    return klass(cfg, http)


__all__ = ["Provider", "build_provider", "is_configured"]
