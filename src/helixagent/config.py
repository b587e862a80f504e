"""Configuration: one YAML file, ``${VAR}`` / ``${VAR:-default}`` interpolation, strict validation.

Every section is a pydantic model with ``extra="forbid"`` so an unknown or misspelt key is an error
that names the key.  The seed's keys (``providers``, ``http``, ``logging``, ``cache``, ``rate_limits``,
``encryption``, ``environment``) are the public interface and keep their spelling.

This module is the public one: it defines :class:`Config` (the sections composed, with the checks that
span sections), the loader and the masking of secrets, and re-exports every section model; importers
write ``from helixagent.config import X``.  The section models live in ``settings/``, one module per
concern: ``base`` (``Strict``, ``parse_duration``), ``providers`` (``providers``, ``http``), ``serving``
(``server``), ``routing``, ``cache``, ``limits`` (``rate_limits``), ``auth``, ``store`` (``database``,
``encryption``, ``retention``), ``observability`` (``logging``, ``metrics``, ``tracing``), ``features``,
``ensembles`` and ``batches``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .redaction import mask_url
from .settings.auth import AuthConfig
from .settings.base import Strict, parse_duration, redis_url_ok
from .settings.batches import BatchesConfig
from .settings.cache import CacheConfig
from .settings.ensembles import EnsembleConfig, EnsembleJudgeConfig, EnsembleMemberConfig, EnsembleStrategy
from .settings.features import FeatureFlag, FeaturesConfig
from .settings.limits import (AppLimit, BackendErrorPolicy, CostBudget, CostBudgets, DefaultPrice, IPLimit, KeyLimit,
                              RateLimitsConfig, UserLimit)
from .settings.observability import ACCESS_LOG_FIELDS, LoggingConfig, MetricsConfig, TracingConfig
from .settings.providers import (NAME_TO_TYPE, PROVIDER_DEFAULTS, TYPE_TO_WIRE, HTTPConfig, ModelPrice, ProviderConfig,
                                 ProviderType)
from .settings.routing import (AliasTarget, BreakerConfig, EmbeddingCoalesceConfig, HedgingConfig, QueueConfig,
                               RetryConfig, RouteConfig, RoutingConfig, SharedHealthConfig)
from .settings.serving import DEFAULT_PORT, ServerConfig, TLSConfig
from .settings.store import DatabaseConfig, EncryptionConfig, RetentionConfig

__all__ = [
    # the whole config, loading, masking
    "Config", "ConfigError", "RedisConfig", "interpolate", "load_config", "load_config_dict", "load_config_text",
    "masked_dict", "mask_secret", "SECRET_KEYS",
    # settings.base
    "Strict", "parse_duration",
    # settings.providers
    "PROVIDER_DEFAULTS", "NAME_TO_TYPE", "TYPE_TO_WIRE", "ProviderType", "ModelPrice", "ProviderConfig",
    "HTTPConfig",
    # settings.serving
    "DEFAULT_PORT", "TLSConfig", "ServerConfig",
    # settings.observability
    "ACCESS_LOG_FIELDS", "LoggingConfig", "MetricsConfig", "TracingConfig",
    # settings.routing
    "AliasTarget", "BreakerConfig", "RetryConfig", "HedgingConfig", "RouteConfig", "QueueConfig",
    "EmbeddingCoalesceConfig", "SharedHealthConfig", "RoutingConfig",
    # settings.cache
    "CacheConfig",
    # settings.limits
    "IPLimit", "KeyLimit", "UserLimit", "AppLimit", "CostBudget", "CostBudgets", "BackendErrorPolicy",
    "DefaultPrice", "RateLimitsConfig",
    # settings.auth
    "AuthConfig",
    # settings.store
    "DatabaseConfig", "EncryptionConfig", "RetentionConfig",
    # settings.features
    "FeatureFlag", "FeaturesConfig",
    # settings.ensembles
    "EnsembleStrategy", "EnsembleMemberConfig", "EnsembleJudgeConfig", "EnsembleConfig",
    # settings.batches
    "BatchesConfig",
]


# ``redis:`` -- the Redis every Redis-backed section uses unless it names its own (Config._cross_checks)
class RedisConfig(Strict):
    # redis://, rediss:// (TLS), redis+sentinel://h:26379[,h2]/<service>/<db>, redis+cluster://h:p[,h:p]
    url: str | None = None

    _u = field_validator("url")(lambda v: redis_url_ok(v))


class Config(Strict):
    environment: str = "development"
    server: ServerConfig = Field(default_factory=ServerConfig)
    providers: list[ProviderConfig] = Field(default_factory=list)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    ensembles: dict[str, EnsembleConfig] = Field(default_factory=dict)  # reachable as model ensemble/<name>
    batches: BatchesConfig = Field(default_factory=BatchesConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        names = [p.name for p in self.providers]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise ValueError(f"providers[{i}].name: duplicate provider name {n!r}")
            seen.add(n)
        for i, p in enumerate(self.providers):
            for target in p.fallback_to:
                if target not in seen:
                    raise ValueError(
                        f"providers[{i}].fallback_to: {target!r} is not a configured provider "
                        f"(known: {', '.join(names) or 'none'})")
        for alias, targets in self.routing.aliases.items():
            for t in targets:
                if t.provider not in seen:
                    raise ValueError(f"routing.aliases.{alias}: provider {t.provider!r} is not configured")
        for ename, ens in self.ensembles.items():
            used = [m.provider for m in ens.members] + ens.providers + ens.preferred_providers + (
                [ens.judge.provider] if ens.judge is not None else [])
            for pname in used:
                if pname not in seen:
                    raise ValueError(f"ensembles.{ename}: provider {pname!r} is not configured")
            size = len(ens.members) or len(ens.providers) or len(ens.models)
            if not size:
                raise ValueError(f"ensembles.{ename}: the panel is empty (set members, providers or models)")
            if ens.providers and ens.models and len(ens.models) != len(ens.providers):
                raise ValueError(f"ensembles.{ename}.models: one model per provider, or none")
            if ens.min_providers > size:
                raise ValueError(f"ensembles.{ename}.min_providers: {ens.min_providers} > the panel's {size} members")
            if ens.judge is None and (ens.strategy == "judge" or (ens.strategy == "debate"
                                                                  and ens.debate_close == "judge")):
                raise ValueError(f"ensembles.{ename}.judge: strategy {ens.strategy!r} needs a judge")
        if self.auth.master_key is None:
            self.auth.master_key = os.environ.get("HELIXAGENT_API_KEY") or None
        shared = self.redis.url
        if shared:
            if self.cache.type == "redis" and not self.cache.redis_url:
                self.cache.redis_url = shared
            if self.rate_limits.backend == "redis" and not self.rate_limits.redis_url:
                self.rate_limits.redis_url = shared
        sh = self.routing.shared_health
        if sh.redis_url is None and shared and sh.enabled is not False:
            sh.redis_url = shared
        if sh.key_prefix is None:
            sh.key_prefix = self.auth.redis_prefix
        if sh.enabled is None:
            sh.enabled = bool(sh.redis_url)
        elif sh.enabled and not sh.redis_url:
            raise ValueError("routing.shared_health: enabled needs routing.shared_health.redis_url or redis.url")
        if self.cache.enabled and self.cache.type == "redis" and not self.cache.redis_url:
            raise ValueError("cache: type redis needs cache.redis_url or redis.url")
        if self.rate_limits.backend == "redis" and not self.rate_limits.redis_url:
            raise ValueError("rate_limits: backend redis needs rate_limits.redis_url or redis.url")
        return self

    def provider(self, name: str) -> ProviderConfig | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None


class ConfigError(Exception):
    """A configuration problem, with a message that names the key."""


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def interpolate(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` without default becomes empty."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        val = env.get(m.group(1))
        if val is None or (val == "" and m.group(2) is not None):
            return m.group(2) if m.group(2) is not None else ""
        return val

    return _VAR_RE.sub(sub, text)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for x in e["loc"]:
            loc += f"[{x}]" if isinstance(x, int) else (f".{x}" if loc else str(x))
        loc = loc or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a HelixAgent setting; check the spelling)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"  {loc}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config_text(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.safe_load(interpolate(text)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    return load_config_dict(data, source)


def load_config_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load from ``path``, else ``$HELIXAGENT_CONFIG``, else the embedded defaults."""
    path = path or os.environ.get("HELIXAGENT_CONFIG")
    if not path:
        return load_config_dict({}, "<defaults>")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return load_config_text(p.read_text(), str(p))


SECRET_KEYS = {"api_key", "master_key", "password", "secret", "token"}


def masked_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with every secret masked (for `config check`)."""
    data = cfg.model_dump(mode="json")

    def mask(obj: Any, key: str | None = None) -> Any:
        if isinstance(obj, dict):
            return {k: mask(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mask(v) for v in obj]
        if key and (key in SECRET_KEYS or key.endswith("_key")) and obj:
            return mask_secret(str(obj))
        if key and key.endswith("url") and isinstance(obj, str):
            return mask_url(obj)  # the userinfo password and *password= query values
        return obj

    masked: dict[str, Any] = mask(data)
    return masked


def mask_secret(s: str) -> str:
    if len(s) <= 8:
        return "****"
    return s[:3] + "****" + s[-2:]
