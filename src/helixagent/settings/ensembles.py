"""``ensembles:`` -- named panels of providers (docs/ensemble.md); also the schema of a request's
``ensemble_config``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Strict


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
