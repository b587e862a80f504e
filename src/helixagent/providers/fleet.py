"""The set of provider objects a configuration asks for: built at start-up, rebuilt by a config reload.

A reload passes the previous fleet: a provider whose configuration (its ``providers[]`` entry and the
``http:`` pool settings) is unchanged keeps its object -- its client and connection pool -- and only new
or changed entries are built."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import PROVIDER_DEFAULTS, Config, ConfigError, HTTPConfig, ProviderConfig
from .base import Provider

log = logging.getLogger("helixagent")


@dataclass
class Fleet:
    providers: dict[str, Provider] = field(default_factory=dict)
    # name -> the config entry each provider object was built from (the reuse test of the next reload)
    sources: dict[str, ProviderConfig] = field(default_factory=dict)
    http: HTTPConfig | None = None
    mock_fallback: bool = False

    def retired_by(self, new: "Fleet") -> list[Provider]:
        """The objects of this fleet that ``new`` does not use (to close once their requests are done)."""
        kept = {id(p) for p in new.providers.values()}
        return [p for p in self.providers.values() if id(p) not in kept]


def build_fleet(cfg: Config, http: HTTPConfig, previous: Fleet | None = None) -> Fleet:
    """The providers of ``cfg``: every enabled provider that has what it needs (a key, unless its server
    needs none).  When none has: in development (``preflight.DEV_ENVIRONMENTS``) each configured
    provider is served by a built-in mock stand-in (deterministic text), so a fresh install answers at
    once; it is still routed to by the configured name, but its answers are labelled ``mock`` in headers,
    metrics, logs and records, and ``/health`` says ``degraded``.  Any other environment is a
    ConfigError: a production gateway must not answer with made-up text under a vendor's name unless the
    config asks for the mock explicitly (a provider with ``type: mock``).  ``http`` is the pool
    configuration (the one the process started with: a reload does not change it)."""
    from . import build_provider, is_configured
    out = Fleet(http=http)
    enabled = [pc for pc in cfg.providers if pc.enabled]

    def build(name: str, pc: ProviderConfig, src: ProviderConfig) -> Provider:
        if previous is not None and previous.mock_fallback == out.mock_fallback:
            old = previous.providers.get(name)
            if old is not None and previous.sources.get(name) == src and previous.http == http:
                out.sources[name] = src
                return old
        out.sources[name] = src
        return build_provider(pc, http)

    if not any(is_configured(pc) for pc in enabled):
        from .. import preflight
        problem = preflight.no_provider_problem(cfg)
        if problem:
            raise ConfigError(problem)
        out.mock_fallback = True
        for pc in enabled:
            data = pc.model_dump()
            data.update(type="mock", base_url=None, api_key=None)
            p = out.providers[pc.name] = build(pc.name, ProviderConfig(**data), pc)
            p.stand_in_for = pc.type
            p.name = "mock"  # the label wherever the answer is counted (ctx.provider comes from it)
        if not out.providers:
            mock = ProviderConfig(name="mock", type="mock")
            out.providers["mock"] = build("mock", mock, mock)
        log.warning(
            "no upstream API key is configured: serving the built-in mock provider (deterministic text)%s. "
            "Set OPENAI_API_KEY, ANTHROPIC_API_KEY, DEEPSEEK_API_KEY or GEMINI_API_KEY in the environment, "
            "or api_key under providers: in the config file, to use real models.",
            f" in place of {', '.join(pc.name for pc in enabled)}" if enabled else "")
        return out
    for pc in enabled:
        if not is_configured(pc):
            env = PROVIDER_DEFAULTS.get(pc.type or "", {}).get("api_key_env")  # where config.py looks for it
            log.warning("provider %s has no API key (set %s or providers[].api_key); it is disabled",
                        pc.name, env or "its key")
            continue
        out.providers[pc.name] = build(pc.name, pc, pc)
    return out
