"""``providers:`` (one entry per upstream, docs/providers.md) and ``http:`` (the pooled upstream
HTTP client every provider uses)."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict, parse_duration


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
