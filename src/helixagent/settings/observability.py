"""``logging:``, ``metrics:`` and ``tracing:`` (docs/observability.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Strict


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


class MetricsConfig(Strict):
    enabled: bool = True
    path: str = "/metrics"
    port: int | None = Field(default=None, gt=0, lt=65536)


class TracingConfig(Strict):
    enabled: bool = False
    service_name: str = "helixagent"
