"""What every settings module shares: the strict base model, duration parsing and the Redis URL / key-prefix
checks."""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def redis_url_ok(value: str | None) -> str | None:
    """A Redis URL of a supported kind (redis, rediss, redis+sentinel, redis+cluster; see
    helixagent.redis_client); the error never quotes the password."""
    if value:
        from ..redis_client import parse_url
        parse_url(value)
    return value


def no_braces(value: str) -> str:
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
