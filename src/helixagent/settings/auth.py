"""``auth:`` -- the master key and the virtual-key cache (docs/keys-and-limits.md)."""
from __future__ import annotations

from pydantic import Field, field_validator

from .base import Strict, no_braces, parse_duration, redis_url_ok


class AuthConfig(Strict):
    master_key: str | None = None
    # How long a verified virtual key is trusted from process memory while the Redis key-change
    # subscription is live (without one: at most 1s).  See docs/keys-and-limits.md.
    key_cache_ttl: float = 60.0
    # Redis for key-change notifications between instances; defaults to redis.url, else rate_limits.redis_url.
    redis_url: str | None = None
    redis_prefix: str = Field(default="helixagent", min_length=1)

    _d = field_validator("key_cache_ttl", mode="before")(lambda v: parse_duration(v))
    _u = field_validator("redis_url")(lambda v: redis_url_ok(v))
    _p = field_validator("redis_prefix")(lambda v: no_braces(v))
