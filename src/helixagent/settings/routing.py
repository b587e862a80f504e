"""``routing:`` -- strategy, aliases, routes, retries, breakers, hedging, queues, embedding coalescing
and shared health (docs/routing.md)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict, no_braces, parse_duration, redis_url_ok


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
    _u = field_validator("redis_url")(lambda v: redis_url_ok(v))
    _p = field_validator("key_prefix")(lambda v: v if v is None else no_braces(v))

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
