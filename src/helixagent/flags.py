"""Feature flags (``features:``): ``streaming``, ``caching`` and ``multi_tenant``, evaluated on every
request from the current configuration (so a reload flips them live).  See docs/features.md.

A flag is on for a request when, in order:

1. ``environments`` is empty or lists the gateway's ``environment`` -- else it is off for everyone;
2. the caller's key id is in ``keys`` or its user id in ``users`` -- then it is on;
3. ``enabled`` is false -- then it is off;
4. ``percentage`` is unset -- then it is on; else it is on for that share of key ids, by a stable hash
   of (flag name, key id) (a caller without a key id -- the master key, open local mode -- counts as
   its user id, else as off unless the percentage is 100).

The rules are compiled once per configuration into :class:`Rule`; evaluating one costs a few attribute
reads and, only for a percentage, one CRC32 of the key id (cached per key id).
"""
from __future__ import annotations

import zlib
from typing import Any

from .config import Config, FeatureFlag
from .errors import GatewayError
from .gateway_types import GatewayLike
from .pipeline import Identity, RequestContext, Stage

FLAGS = ("streaming", "caching", "multi_tenant")
_BUCKETS = 10_000  # percentage resolution: 0.01 %
_MAX_MEMO = 100_000


def bucket(flag: str, key_id: str) -> int:
    """0.._BUCKETS-1, stable across processes, restarts and versions (CRC32, not Python's salted hash)."""
    return zlib.crc32(f"{flag}\x00{key_id}".encode()) % _BUCKETS


class Rule:
    """One flag compiled for one configuration."""

    __slots__ = ("name", "always", "never", "enabled", "threshold", "keys", "users", "_memo")

    def __init__(self, name: str, fc: FeatureFlag, environment: str):
        self.name = name
        in_env = not fc.environments or environment in fc.environments
        self.keys = frozenset(fc.keys)
        self.users = frozenset(fc.users)
        self.enabled = fc.enabled
        # None: no percentage (on when enabled); else on when bucket < threshold
        self.threshold: int | None = None if fc.percentage is None else round(fc.percentage * _BUCKETS / 100)
        self.never = not in_env or (not fc.enabled and not self.keys and not self.users)
        self.always = in_env and fc.enabled and (self.threshold is None or self.threshold >= _BUCKETS)
        self._memo: dict[str, bool] = {}

    def on(self, ident: Identity | None) -> bool:
        if self.always:
            return True
        if self.never:
            return False
        kid = ident.key_id if ident is not None else None
        uid = ident.user_id if ident is not None else None
        if (kid is not None and kid in self.keys) or (uid is not None and uid in self.users):
            return True
        if not self.enabled:
            return False
        if self.threshold is None:
            return True
        who = kid if kid is not None else uid
        if who is None:
            return False
        hit = self._memo.get(who)
        if hit is None:
            if len(self._memo) >= _MAX_MEMO:
                self._memo.clear()
            hit = self._memo[who] = bucket(self.name, who) < self.threshold
        return hit


class Flags:
    """``gw.services["flags"]``: the compiled rules of the current configuration."""

    def __init__(self, cfg: Config):
        self.streaming, self.caching, self.multi_tenant = self._compile(cfg)

    @staticmethod
    def _compile(cfg: Config) -> tuple[Rule, Rule, Rule]:
        f = cfg.features
        env = cfg.environment
        return (Rule("streaming", f.streaming, env), Rule("caching", f.caching, env),
                Rule("multi_tenant", f.multi_tenant, env))

    def reconfigure(self, cfg: Config) -> None:
        """Apply ``cfg.features`` (one tuple assignment each: a request sees the old rule or the new)."""
        self.streaming, self.caching, self.multi_tenant = self._compile(cfg)

    def enabled(self, name: str, ident: Identity | None) -> bool:
        rule: Rule = getattr(self, name)
        return rule.on(ident)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FLAGS:
            r: Rule = getattr(self, name)
            out[name] = "on" if r.always else "off" if r.never else "partial"
        return out


class FlagsStage(Stage):
    """After auth: a ``stream: true`` request while ``streaming`` is off for the caller is a 400 naming
    ``stream`` (in the client's error format, as every pipeline error)."""

    name = "flags"

    def __init__(self, flags: Flags):
        self.flags = flags

    async def pre(self, ctx: RequestContext) -> bool:
        rule = self.flags.streaming
        if rule.always:
            return False
        if getattr(ctx.request, "stream", False) and not rule.on(ctx.identity):
            raise GatewayError(400, "streaming is not enabled for this API key (features.streaming); send the "
                                    "request without stream: true", param="stream", code="streaming_disabled")
        return False


def install(gw: GatewayLike) -> None:
    flags = Flags(gw.cfg)
    gw.services["flags"] = flags
    gw.add_stage(FlagsStage(flags))
