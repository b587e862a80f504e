"""``features:`` -- feature flags (docs/features.md)."""
from __future__ import annotations

from pydantic import Field

from .base import Strict


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
