"""Configuration: one YAML file, ``${VAR}`` / ``${VAR:-default}`` interpolation, strict validation.

Every section is a pydantic model with ``extra="forbid"`` so an unknown or misspelt key is an error
that names the key.  The seed's keys (``providers``, ``http``, ``logging``, ``cache``, ``rate_limits``,
``encryption``, ``environment``) are the public interface and keep their spelling.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PORT = 7061

# Provider types and what a provider of that type gets when the config does not say.
PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {
    "openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"},
    "deepseek": {"base_url": "https://api.deepseek.com/v1", "api_key_env": "DEEPSEEK_API_KEY"},
    "anthropic": {"base_url": "https://api.anthropic.com", "api_key_env": "ANTHROPIC_API_KEY"},
    "gemini": {"base_url": "https://generativelanguage.googleapis.com", "api_key_env": "GEMINI_API_KEY"},
    "openai_compatible": {"base_url": "", "api_key_env": ""},
    "mock": {"base_url": "", "api_key_env": ""},
}
# A provider named like a vendor gets that vendor's type (the seed writes just `name: claude`).
ProviderType = Literal["openai", "deepseek", "openai_compatible", "anthropic", "gemini", "mock"]
NAME_TO_TYPE: dict[str, ProviderType] = {
    "openai": "openai", "gpt": "openai", "azure": "openai",
    "claude": "anthropic", "anthropic": "anthropic",
    "deepseek": "deepseek",
    "gemini": "gemini", "google": "gemini",
    "mock": "mock",
}
# The wire format each type speaks.
TYPE_TO_WIRE = {
    "openai": "openai", "deepseek": "openai", "openai_compatible": "openai",
    "anthropic": "anthropic", "gemini": "gemini", "mock": "mock",
}

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _redis_url_ok(value: str | None) -> str | None:
    """A Redis URL of a supported kind (redis, rediss, redis+sentinel, redis+cluster; see
    helixagent.redis_client); the error never quotes the password."""
    if value:
        from .redis_client import parse_url
        parse_url(value)
    return value


def _no_braces(value: str) -> str:
    """Key prefixes hold no '{' or '}': the gateway puts the Redis Cluster hash tag after them."""
    if "{" in value or "}" in value:
        raise ValueError("must hold no '{' or '}' (the gateway adds the Redis Cluster hash tags itself)")
    return value


def parse_duration(value: Any) -> float:
    """'90s' -> 90.0, '5m' -> 300.0, 1500 -> 1500.0 (seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 5m or 24h")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 90s, 5m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelPrice(Strict):
    input_per_mtok: float | None = Field(default=None, ge=0)
    output_per_mtok: float | None = Field(default=None, ge=0)
    context_window: int | None = Field(default=None, gt=0)


class ProviderConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    type: ProviderType | None = None
    base_url: str | None = None
    api_key: str | None = None
    models: list[str] = Field(default_factory=list)
    priority: int = 100
    fallback_to: list[str] = Field(default_factory=list)
    timeout_ms: int = Field(default=60000, gt=0)
    connect_timeout_ms: int | None = Field(default=None, gt=0)
    first_byte_timeout_ms: int | None = Field(default=None, gt=0)
    max_cost_per_token: float | None = Field(default=None, ge=0)
    max_cost_per_request: float | None = Field(default=None, ge=0)
    max_retries: int = Field(default=1, ge=0, le=10)
    weight: float = Field(default=1.0, ge=0)
    enabled: bool = True
    headers: dict[str, str] = Field(default_factory=dict)
    # Anthropic: the API requires max_tokens; this is sent when the client gives none.
    default_max_tokens: int = Field(default=4096, gt=0)
    api_version: str | None = None
    # Per-model price / context overrides on top of the shipped catalogue.
    model_prices: dict[str, ModelPrice] = Field(default_factory=dict)
    # mock provider knobs
    latency_ms: float = Field(default=0, ge=0)
    tokens_per_second: float = Field(default=0, ge=0)
    mock_tokens: int = Field(default=16, ge=1)
    # Adapt a request this provider cannot serve as asked (clamp/drop parameters, named in the
    # x-helixagent-dropped-params header) instead of skipping it; None = the route's or routing's setting.
    drop_params: bool | None = None
    # Concurrency caps (per gateway process) served by a priority queue (routing/queue.py, docs/routing.md
    # "Queues and priorities"); http.max_conns_per_host caps every provider too.  queue_timeout_ms: the
    # longest wait for a slot (None = routing.queue.timeout_ms).
    max_concurrency: int | None = Field(default=None, ge=1)
    models_concurrency: dict[str, int] = Field(default_factory=dict)
    queue_timeout_ms: int | None = Field(default=None, ge=0)

    @field_validator("models_concurrency")
    @classmethod
    def _model_caps(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [m for m, n in v.items() if isinstance(n, bool) or n < 1]
        if bad:
            raise ValueError(f"models_concurrency: the cap of {', '.join(map(repr, bad))} must be at least 1")
        return v

    @model_validator(mode="after")
    def _fill_defaults(self) -> "ProviderConfig":
        if self.type is None:
            low = self.name.lower()
            self.type = NAME_TO_TYPE.get(low) or next(
                (t for k, t in NAME_TO_TYPE.items() if low.startswith(k)), None)
            if self.type is None:
                raise ValueError(
                    f"provider {self.name!r}: cannot infer 'type' from the name; set type to one of "
                    "openai, deepseek, openai_compatible, anthropic, gemini, mock")
        d = PROVIDER_DEFAULTS[self.type]
        if not self.base_url:
            if self.type == "openai_compatible":
                raise ValueError(f"provider {self.name!r}: type openai_compatible needs a base_url")
            self.base_url = d["base_url"]
        self.base_url = self.base_url.rstrip("/")
        if self.api_key is None and d["api_key_env"]:
            self.api_key = os.environ.get(d["api_key_env"]) or None
        if self.api_key == "":
            self.api_key = None
        if self.name in self.fallback_to:
            raise ValueError(f"provider {self.name!r} lists itself in fallback_to")
        stray = [m for m in self.models_concurrency if self.models and m not in self.models]
        if stray:  # a cap on a model this provider never serves is a typo that would cap nothing
            raise ValueError(f"provider {self.name!r}: models_concurrency names {', '.join(map(repr, stray))}, "
                             f"which is not in its models ({', '.join(self.models)})")
        return self

    @property
    def wire(self) -> str:
        return TYPE_TO_WIRE[self.type or "openai"]


class HTTPConfig(Strict):
    max_idle_conns: int = Field(default=100, gt=0)
    max_conns_per_host: int = Field(default=0, ge=0)  # 0 = unlimited
    idle_conn_timeout: float = 90.0

    _d = field_validator("idle_conn_timeout", mode="before")(lambda v: parse_duration(v))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class TLSConfig(Strict):
    """``server.tls``: HTTPS on the gateway's own port.  Unset fields default from the environment:
    ``HTTPS_ENABLED`` (true/false), ``TLS_CERT_PATH``, ``TLS_KEY_PATH``."""
    enabled: bool | None = None
    cert_path: str | None = None  # PEM certificate (chain), server first
    key_path: str | None = None  # PEM private key (unencrypted)

    @model_validator(mode="after")
    def _from_env(self) -> "TLSConfig":
        if self.enabled is None:
            raw = os.environ.get("HTTPS_ENABLED", "").strip().lower()
            if raw not in _TRUE + _FALSE:
                raise ValueError(f"HTTPS_ENABLED must be true or false, not {raw!r}")
            self.enabled = raw in _TRUE
        if self.cert_path is None:
            self.cert_path = os.environ.get("TLS_CERT_PATH") or None
        if self.key_path is None:
            self.key_path = os.environ.get("TLS_KEY_PATH") or None
        if self.enabled and not (self.cert_path and self.key_path):
            raise ValueError("TLS is enabled (server.tls.enabled / HTTPS_ENABLED) but server.tls.cert_path "
                             "(TLS_CERT_PATH) and server.tls.key_path (TLS_KEY_PATH) are not both set")
        return self


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, gt=0, lt=65536)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # limits of the HTTP server itself (api/server.py), per worker; see docs/keys-and-limits.md
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers; beyond: 431
    max_headers: int = Field(default=100, ge=1)  # header fields per request; beyond: 431
    header_timeout: float = Field(default=10.0, gt=0)  # a request's head must arrive within this
    body_timeout: float = Field(default=30.0, gt=0)  # its body within this, once the head is in
    keep_alive_timeout: float = Field(default=5.0, gt=0)  # an idle keep-alive connection is closed after
    max_connections: int = Field(default=2048, ge=1)  # open connections per worker; beyond: 503 + close
    drain_timeout: float = Field(default=30.0, ge=0)  # on shutdown, how long running requests may finish
    _server_d = field_validator("header_timeout", "body_timeout", "keep_alive_timeout", "drain_timeout",
                                mode="before")(lambda v: parse_duration(v))
    workers: int = Field(default=1, ge=1)
    trust_forwarded_for: bool = False
    # networks of the reverse proxies in front of the gateway; X-Forwarded-For is read from the right
    # through them (see api/forwarded.py and docs/keys-and-limits.md); setting it turns the header on
    trusted_proxies: list[str] = Field(default_factory=list)
    # on SIGTERM, /readyz answers 503 for this long (requests are still served) before the drain begins
    drain_readiness_delay: float = Field(default=0.0, ge=0)
    _drain_delay_d = field_validator("drain_readiness_delay", mode="before")(lambda v: parse_duration(v))
    tls: TLSConfig = Field(default_factory=dict, validate_default=True)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        from .api.forwarded import parse_networks
        return [str(n) for n in parse_networks(v)]


# The fields of the access log (one line per request); `logging.fields` selects a subset.
ACCESS_LOG_FIELDS = (
    "timestamp", "method", "path", "ip", "user_agent", "response_time", "status_code", "request_id",
    "client_request_id", "endpoint", "provider", "model", "stream", "tokens", "cost", "cache", "key_id", "user",
    "application", "error", "fallbacks", "retries", "ttft", "upstream_latency",
)


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "warn", "error", "critical",
                   "DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"] = "info"
    format: Literal["json", "console"] = "json"
    fields: list[str] | None = None
    include_bodies: bool = False
    file: str | None = None

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [f for f in v if f not in ACCESS_LOG_FIELDS]
        if bad:
            raise ValueError(f"unknown access-log field(s) {', '.join(map(repr, bad))}; known: "
                             f"{', '.join(ACCESS_LOG_FIELDS)}")
        return v


class AliasTarget(Strict):
    provider: str
    model: str


class BreakerConfig(Strict):
    failure_threshold: int = Field(default=5, ge=1)
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    min_requests: int = Field(default=20, ge=1)
    window: float = 60.0
    cooldown: float = 30.0
    half_open_probes: int = Field(default=1, ge=1)

    _d = field_validator("window", "cooldown", mode="before")(lambda v: parse_duration(v))


class RetryConfig(Strict):
    max_attempts: int = Field(default=2, ge=1, le=10)
    backoff_base_ms: int = Field(default=100, ge=0)
    backoff_max_ms: int = Field(default=2000, ge=0)
    max_retry_after_ms: int = Field(default=5000, ge=0)


class HedgingConfig(Strict):
    enabled: bool = False
    min_delay_ms: int = Field(default=50, ge=0)
    max_extra: int = Field(default=1, ge=1)
    # A provider's p95 is trusted once it has this many latency samples; before that no hedge is sent.
    min_samples: int = Field(default=8, ge=1)


class RouteConfig(Strict):
    # Public model names (or aliases) this route applies to; a trailing '*' matches a prefix.
    models: list[str] = Field(default_factory=list)
    strategy: Literal["priority", "cost", "latency", "weighted"] | None = None
    hedging: HedgingConfig | None = None
    max_cost_per_token: float | None = Field(default=None, ge=0)
    max_cost_per_request: float | None = Field(default=None, ge=0)
    # drop_params for requests of these models (wins over the provider's and the global setting)
    drop_params: bool | None = None


class QueueConfig(Strict):
    """``routing.queue``: how requests wait for a provider's concurrency slot (docs/routing.md)."""
    timeout_ms: int = Field(default=30000, ge=0)  # longest wait for a slot (0: 503 at once when busy)
    max_waiting: int = Field(default=10000, ge=1)  # waiters per provider; beyond: 503 at once
    fair_share: Literal["api_key", "user", "application"] = "api_key"  # whose share is weighed


class EmbeddingCoalesceConfig(Strict):
    """``routing.embedding_coalesce``: concurrent embedding requests sent upstream as one call."""
    enabled: bool = False
    window_ms: float = Field(default=5.0, ge=0, le=1000)  # how long the first request waits for company
    max_inputs: int = Field(default=256, ge=2, le=2048)  # inputs per combined call (a full batch leaves at once)


class SharedHealthConfig(Strict):
    """Breaker state, Retry-After cooldowns and health scores shared by every instance through Redis
    (docs/routing.md, "Several instances").  ``routing.shared_health: false`` is ``{enabled: false}``."""
    # None: on whenever a Redis URL is known (redis_url here, else redis.url)
    enabled: bool | None = None
    redis_url: str | None = None
    # keys are <key_prefix>:{health:<provider>}:... (one hash slot per provider); default auth.redis_prefix
    key_prefix: str | None = Field(default=None, min_length=1)
    # how often each instance publishes its EWMAs and re-reads the fleet's state (missed messages, merge)
    sync_interval: float = Field(default=1.0, gt=0)
    # a Redis command slower than this counts as an outage (local-only health until Redis answers again)
    redis_timeout: float = Field(default=0.5, gt=0)

    _d = field_validator("sync_interval", "redis_timeout", mode="before")(lambda v: parse_duration(v))

    @model_validator(mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v


class RoutingConfig(Strict):
    strategy: Literal["priority", "cost", "latency", "weighted"] = "priority"
    aliases: dict[str, list[AliasTarget]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    hedging: HedgingConfig = Field(default_factory=HedgingConfig)
    # Cost limits applied to every provider (a provider's own limit, when lower, wins).
    max_cost_per_token: float | None = Field(default=None, ge=0)
    max_cost_per_request: float | None = Field(default=None, ge=0)
    # Completion tokens assumed by max_cost_per_request when the request sets no max_tokens.
    estimate_completion_tokens: int = Field(default=1024, ge=0)
    # Budget of one request across all attempts, retries, back-off sleeps and fallbacks.
    request_timeout_ms: int = Field(default=120000, gt=0)
    # Adapt (clamp/drop) parameters a candidate cannot serve instead of skipping it (docs/routing.md)
    drop_params: bool = False
    # Cross-request cooldown of a (provider, model) that answered 429 (or 503/529 with Retry-After):
    # benched for its Retry-After, at most rate_limit_cooldown_max (0 = off); without a Retry-After,
    # for rate_limit_cooldown_default once rate_limit_cooldown_after consecutive 429s were seen.
    rate_limit_cooldown_max: float = Field(default=60.0, ge=0)
    rate_limit_cooldown_default: float = Field(default=1.0, ge=0)
    rate_limit_cooldown_after: int = Field(default=3, ge=1)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    embedding_coalesce: EmbeddingCoalesceConfig = Field(default_factory=EmbeddingCoalesceConfig)
    shared_health: SharedHealthConfig = Field(default_factory=SharedHealthConfig)

    _rl = field_validator("rate_limit_cooldown_max", "rate_limit_cooldown_default",
                          mode="before")(lambda v: parse_duration(v))


class CacheConfig(Strict):
    enabled: bool = False
    type: Literal["memory", "redis"] = "memory"
    ttl: float = 3600.0
    max_size: int = Field(default=10000, ge=1)
    max_bytes: int | None = Field(default=None, gt=0)
    redis_url: str | None = None
    cache_nonzero_temperature: bool = False
    scope: Literal["application", "global"] = "application"
    dedupe: bool = True
    # With a Redis (type redis, or redis.url set): identical concurrent requests on different instances
    # share one upstream call too (a lease per flight, renewed every flight_lease/3; a leader that dies is
    # replaced within flight_lease).  See docs/cache.md "Several instances".
    dedupe_across_instances: bool = True
    flight_lease: float = Field(default=5.0, gt=0)
    # Redis: every key is prefixed (several gateways or environments can share one Redis)
    key_prefix: str = "helixagent:cache:"
    # Redis: connect / command timeout; a slower Redis counts as unreachable for that request
    redis_timeout: float = Field(default=0.5, gt=0)
    # Redis: connections per gateway process; beyond them a lookup waits for a free one (at most
    # redis_pool_timeout, then that request goes upstream without the cache; Redis is not marked down)
    redis_pool_size: int = Field(default=100, ge=1)
    redis_pool_timeout: float = Field(default=2.0, gt=0)

    _d = field_validator("ttl", "redis_timeout", "redis_pool_timeout", "flight_lease",
                         mode="before")(lambda v: parse_duration(v))
    _u = field_validator("redis_url")(lambda v: _redis_url_ok(v))
    _p = field_validator("key_prefix")(lambda v: _no_braces(v))

    @field_validator("ttl")
    @classmethod
    def _ttl_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("ttl must be positive (e.g. 300s, 1h)")
        return v


class IPLimit(Strict):
    requests_per_minute: int | None = Field(default=None, ge=0)
    burst_size: int | None = Field(default=None, ge=0)


class KeyLimit(Strict):
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)


class UserLimit(Strict):
    tokens_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)


class AppLimit(Strict):
    tokens_per_month: int | None = Field(default=None, ge=0)


class CostBudget(Strict):
    per_day: float | None = Field(default=None, ge=0)
    per_month: float | None = Field(default=None, ge=0)


class CostBudgets(Strict):
    api_key: CostBudget | None = None
    user: CostBudget | None = None
    application: CostBudget | None = None


class BackendErrorPolicy(Strict):
    requests: Literal["allow", "deny"] = "allow"
    budgets: Literal["allow", "deny"] = "deny"


class DefaultPrice(Strict):
    input: float = Field(ge=0)
    output: float = Field(ge=0)


class RateLimitsConfig(Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    on_backend_error: BackendErrorPolicy = Field(default_factory=BackendErrorPolicy)
    ip: IPLimit | None = None
    api_key: KeyLimit | None = None
    user: UserLimit | None = None
    application: AppLimit | None = None
    cost: CostBudgets | None = None
    # Redis keys are named <key_prefix>:rl:...
    key_prefix: str = Field(default="helixagent", min_length=1)
    # socket timeout for each Redis call; past it on_backend_error decides.  3 s by default: a timed-out
    # command is taken for an outage, and a saturated process's own event-loop lag (measured up to 1.9 s on
    # 2 cores at 1,000 concurrent requests) must not switch the limits off; a refused connection is seen at once.
    redis_timeout: float = Field(default=3.0, gt=0)
    # Redis connections per gateway process.  More concurrent requests than this WAIT for a free
    # connection (back-pressure, never an outage), at most redis_pool_timeout; past it that one request
    # gets a 503 rate_limit_backend_busy (the backend is not marked down).
    redis_pool_size: int = Field(default=100, ge=1)
    redis_pool_timeout: float = Field(default=5.0, gt=0)
    # Completion tokens reserved for a request that sets no max_tokens (settled to the real usage after).
    default_completion_tokens: int = Field(default=1024, ge=0)
    # A request under a dollar budget whose model has no known price (no catalogue entry, no
    # model_prices): "reject" answers 400 (the safe default: an unpriced call cannot be bounded);
    # "default" counts it at default_price_per_mtok.  See docs/keys-and-limits.md.
    unknown_price: Literal["reject", "default"] = "reject"
    default_price_per_mtok: DefaultPrice | None = None

    _rlp = field_validator("redis_pool_timeout", mode="before")(lambda v: parse_duration(v))
    _u = field_validator("redis_url")(lambda v: _redis_url_ok(v))
    _p = field_validator("key_prefix")(lambda v: _no_braces(v))

    @field_validator("on_backend_error", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        if isinstance(v, str):  # one word applies to both
            return {"requests": v, "budgets": v}
        return v

    @model_validator(mode="after")
    def _redis_url(self) -> "RateLimitsConfig":
        if self.backend == "memory" and self.redis_url and self.redis_url.startswith(("redis://", "rediss://",
                                                                                     "redis+", "rediss+")):
            self.backend = "redis"
        if self.unknown_price == "default" and self.default_price_per_mtok is None:
            raise ValueError("rate_limits.unknown_price: default needs rate_limits.default_price_per_mtok "
                             "({input: <USD per million input tokens>, output: <USD per million output tokens>})")
        return self


class AuthConfig(Strict):
    master_key: str | None = None
    # How long a verified virtual key is trusted from process memory while the Redis key-change
    # subscription is live (without one: at most 1s).  See docs/keys-and-limits.md.
    key_cache_ttl: float = 60.0
    # Redis for key-change notifications between instances; defaults to redis.url, else rate_limits.redis_url.
    redis_url: str | None = None
    redis_prefix: str = Field(default="helixagent", min_length=1)

    _d = field_validator("key_cache_ttl", mode="before")(lambda v: parse_duration(v))
    _u = field_validator("redis_url")(lambda v: _redis_url_ok(v))
    _p = field_validator("redis_prefix")(lambda v: _no_braces(v))


class DatabaseConfig(Strict):
    url: str = "sqlite:///./helixagent.db"
    # Reads for reports (GET /v1/usage, `helixagent usage`) go here when set; writes never do.  See
    # docs/records.md#connection-pool-and-read-replica.
    read_url: str | None = None
    # Connection pool, per pool and per worker process (store/db.py maps them onto SQLAlchemy's):
    # max_open_conns is the hard cap, max_idle_conns the connections kept open when idle (pool_size is its
    # older name), conn_max_lifetime recycles older connections, pool_timeout is the longest wait for one.
    pool_size: int | None = Field(default=None, ge=1)
    max_open_conns: int | None = Field(default=None, ge=1)
    max_idle_conns: int | None = Field(default=None, ge=1)
    conn_max_lifetime: float | None = None
    pool_timeout: float = 10.0
    spool_dir: str = "./spool"
    batch_size: int = Field(default=500, ge=1)
    queue_size: int = Field(default=10000, ge=1)
    flush_interval: float = 0.2
    record_bodies: bool = True
    # run `migrate up` at start-up; default (None): yes for SQLite, no for PostgreSQL
    auto_migrate: bool | None = None
    # how often the writer probes an unreachable database, and fsyncs spool segments meanwhile
    retry_interval: float = 1.0
    spool_fsync_interval: float = 1.0

    _d = field_validator("flush_interval", "retry_interval", "spool_fsync_interval", "pool_timeout",
                         mode="before")(lambda v: parse_duration(v))
    _lt = field_validator("conn_max_lifetime", mode="before")(
        lambda v: None if v is None else parse_duration(v))

    @model_validator(mode="after")
    def _pool(self) -> "DatabaseConfig":
        if self.pool_size is not None and self.max_idle_conns is not None and self.pool_size != self.max_idle_conns:
            raise ValueError(f"database.pool_size ({self.pool_size}) and database.max_idle_conns "
                             f"({self.max_idle_conns}) are the same setting (pool_size is its older name): "
                             "give one of them")
        idle = self.max_idle_conns if self.max_idle_conns is not None else self.pool_size
        if idle is not None and self.max_open_conns is not None and idle > self.max_open_conns:
            key = "max_idle_conns" if self.max_idle_conns is not None else "pool_size"
            raise ValueError(f"database.{key} ({idle}) is more than database.max_open_conns "
                             f"({self.max_open_conns}): no more connections can be kept idle than may be open")
        if self.conn_max_lifetime is not None and self.conn_max_lifetime <= 0:
            raise ValueError("database.conn_max_lifetime must be a positive duration (e.g. 30m); leave it out "
                             "to keep connections without a limit")
        if self.pool_timeout <= 0:
            raise ValueError("database.pool_timeout must be a positive duration (e.g. 10s)")
        if self.read_url is not None and not self.read_url.strip():
            self.read_url = None   # `read_url: ${HELIXAGENT_DATABASE_READ_URL}` with the variable unset
        return self

    def pool_limits(self) -> tuple[int, int]:
        """(max_open, max_idle).  Neither given: 20 open, 10 kept.  Only the idle count (max_idle_conns or
        pool_size): twice as many open.  Only max_open_conns: all of them kept."""
        idle = self.max_idle_conns if self.max_idle_conns is not None else self.pool_size
        if self.max_open_conns is not None:
            return self.max_open_conns, idle if idle is not None else self.max_open_conns
        idle = idle if idle is not None else 10
        return 2 * idle, idle


class EncryptionConfig(Strict):
    enabled: bool = False
    algorithm: Literal["aes-256-gcm"] = "aes-256-gcm"
    key_rotation_days: int = Field(default=30, ge=1)
    key_file: str | None = None


class RetentionConfig(Strict):
    days: int = Field(default=90, ge=1)
    purge_interval: float = 3600.0
    batch_size: int = Field(default=1000, ge=1)

    _d = field_validator("purge_interval", mode="before")(lambda v: parse_duration(v))


class MetricsConfig(Strict):
    enabled: bool = True
    path: str = "/metrics"
    port: int | None = Field(default=None, gt=0, lt=65536)


class TracingConfig(Strict):
    enabled: bool = False
    service_name: str = "helixagent"


class RedisConfig(Strict):
    # redis://, rediss:// (TLS), redis+sentinel://h:26379[,h2]/<service>/<db>, redis+cluster://h:p[,h:p]
    url: str | None = None

    _u = field_validator("url")(lambda v: _redis_url_ok(v))


class FeatureFlag(Strict):
    """One feature flag (``features.<name>``; evaluated per request by flags.py, see docs/features.md)."""
    enabled: bool = True  # the state for everyone not listed in keys/users
    percentage: float | None = Field(default=None, ge=0, le=100)  # of key ids (stable hash), when enabled
    keys: list[str] = Field(default_factory=list)  # key ids that always have it (in its environments)
    users: list[str] = Field(default_factory=list)  # user ids that always have it (in its environments)
    environments: list[str] = Field(default_factory=list)  # only in these environments (empty: all)


class FeaturesConfig(Strict):
    streaming: FeatureFlag = Field(default_factory=FeatureFlag)
    caching: FeatureFlag = Field(default_factory=FeatureFlag)
    multi_tenant: FeatureFlag = Field(default_factory=lambda: FeatureFlag(enabled=False))


# -- ensembles (docs/ensemble.md) -------------------------------------------------------------------------
EnsembleStrategy = Literal["majority", "confidence_weighted", "quality_weighted", "judge", "debate"]


class EnsembleMemberConfig(Strict):
    """One panel member: a configured provider and a model (default: the request's model when the provider
    serves it, else the provider's first model); ``weight`` is the member's configured confidence
    (confidence_weighted without logprobs) and quality weight (quality_weighted)."""
    provider: str = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1)
    weight: float = Field(default=1.0, ge=0, le=1000)


class EnsembleJudgeConfig(Strict):
    provider: str = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1)


class EnsembleConfig(Strict):
    """A panel of providers and how their answers are combined: a named ``ensembles:`` entry, or a request's
    ``ensemble_config`` (validated strictly there, then checked against the configured providers)."""
    strategy: EnsembleStrategy = "majority"
    members: list[EnsembleMemberConfig] = Field(default_factory=list, max_length=16)
    providers: list[str] = Field(default_factory=list, max_length=16)   # shortcut for members
    models: list[str] = Field(default_factory=list, max_length=16)      # with providers: one each; alone: routed
    weights: dict[str, float] = Field(default_factory=dict)              # provider -> weight (the shortcut's)
    min_providers: int = Field(default=1, ge=1, le=16)
    confidence_threshold: float = Field(default=0.0, ge=0, le=1)
    fallback_to_best: bool = True
    preferred_providers: list[str] = Field(default_factory=list, max_length=16)
    judge: EnsembleJudgeConfig | None = None
    judge_mode: Literal["synthesis", "pick"] = "synthesis"
    rounds: int = Field(default=2, ge=1, le=5)                          # debate rounds
    debate_close: Literal["vote", "judge"] | None = None                # default: judge when one is set
    panel_timeout_ms: int = Field(default=30000, gt=0, le=600000)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not 0 <= w <= 1000:
                raise ValueError(f"weights.{k}: must be between 0 and 1000")
        return v


class BatchesConfig(Strict):
    """The Files and Batches APIs (docs/batches.md)."""
    enabled: bool = True
    mode: Literal["auto", "local", "native"] = "auto"   # native: at the vendor's batch API (docs/batches.md)
    native_discount: float = Field(default=0.5, ge=0, le=1)  # native cost = list price x this
    native_poll_interval: float = Field(default=30.0, gt=0)  # how often a native batch is polled
    local_concurrency: int = Field(default=4, ge=1)   # lines in flight per instance
    max_file_bytes: int = Field(default=100 * 1024 * 1024, gt=0)   # an upload beyond: 413
    max_lines: int = Field(default=50000, ge=1)
    completion_windows: list[str] = Field(default_factory=lambda: ["24h"], min_length=1)
    lease: float = Field(default=300.0, gt=0)  # a claimed line's lease; renewed while it runs
    poll_interval: float = Field(default=1.0, gt=0)   # how often an idle runner looks for work

    _d = field_validator("lease", "poll_interval", "native_poll_interval",
                         mode="before")(lambda v: parse_duration(v))

    @field_validator("completion_windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        for w in v:
            if parse_duration(w) <= 0:
                raise ValueError(f"completion window {w!r} must be a positive duration")
        return v


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
            # the userinfo password (redis://:pw@host has no user), and *password= query values
            obj = re.sub(r"://([^:/@]*):([^@]+)@", r"://\1:****@", obj)
            return re.sub(r"([?&][A-Za-z_]*password=)[^&]*", r"\1****", obj)
        return obj

    masked: dict[str, Any] = mask(data)
    return masked


def mask_secret(s: str) -> str:
    if len(s) <= 8:
        return "****"
    return s[:3] + "****" + s[-2:]
