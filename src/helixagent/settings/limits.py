"""``rate_limits:`` -- request and token rate limits, dollar budgets and the backend outage policy
(docs/keys-and-limits.md)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict, no_braces, parse_duration, redis_url_ok


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
    _u = field_validator("redis_url")(lambda v: redis_url_ok(v))
    _p = field_validator("key_prefix")(lambda v: no_braces(v))

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
