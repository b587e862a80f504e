"""``batches:`` -- the Files and Batches APIs (docs/batches.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Strict, parse_duration


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
