"""``cache:`` -- the response cache and in-flight de-duplication (docs/cache.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Strict, no_braces, parse_duration, redis_url_ok


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
    _u = field_validator("redis_url")(lambda v: redis_url_ok(v))
    _p = field_validator("key_prefix")(lambda v: no_braces(v))

    @field_validator("ttl")
    @classmethod
    def _ttl_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("ttl must be positive (e.g. 300s, 1h)")
        return v
