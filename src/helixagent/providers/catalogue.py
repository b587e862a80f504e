"""The model catalogue: known models per provider type, their context windows and prices.

Data: ``helixagent/data/models.yaml`` (prices in USD per million tokens), loaded once, overridable per
provider with ``model_prices`` in the config (``input_per_mtok``, ``output_per_mtok``,
``context_window``; any field left out keeps the catalogue's value; a model unknown to the catalogue
becomes known with the fields given).

Stable API (used by routing, limits and metrics; all functions are cheap -- results are memoised per
provider config and model, so they are safe to call on the hot path):

* ``price(provider_cfg, model) -> (input_per_token, output_per_token) | None`` -- USD per token;
  ``None`` when the price is unknown (no catalogue entry and no override, or an incomplete override).
* ``context_window(provider_cfg, model) -> int | None``
* ``max_output_tokens(provider_cfg, model) -> int | None``
* ``estimate_cost(provider_cfg, model, prompt_tokens, completion_tokens, cache_read_tokens=0,
  cache_creation_tokens=0) -> float | None`` -- USD.  ``prompt_tokens`` is OpenAI-style (it includes
  cached and cache-write tokens); those are charged at the cache prices when the catalogue has them.
* ``lookup(provider_cfg, model) -> ModelInfo | None`` -- everything known about the model.
* ``models_for(provider_type) -> list[str]`` and ``known(provider_type, model) -> bool`` -- what a
  provider with no ``models:`` list serves (the catalogue's models and every model of the type's family).

A model of a provider type's family that the catalogue does not know yet (``claude-sonnet-9-9``,
``gpt-5.5-mini``) resolves to the newest known model of its tier (``families`` in models.yaml), with a
warning logged once per model: served, priced (so dollar budgets hold) and never a 404.

``provider_cfg`` is a :class:`~helixagent.config.ProviderConfig` or anything with a ``.cfg`` attribute
holding one (a Provider).  Model names resolve exactly, then without a ``models/`` prefix, then
without a date / version suffix (``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``gemini-1.5-flash-002`` ->
``gemini-1.5-flash``, ``claude-3-5-haiku-20241022`` via its alias list).  ``openai_compatible``
providers look the name up in every section (a vLLM or OpenRouter server serving ``gpt-4o`` prices it
like OpenAI).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

log = logging.getLogger("helixagent.catalogue")
_MTOK = 1_000_000.0
_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{3}|-latest|-preview(-\d{2}-\d{2,4})?|-exp(-\d{4})?)$")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    provider_type: str
    context_window: int | None = None
    max_output_tokens: int | None = None
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    cache_read_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None
    embedding: bool = False
    reasoning: bool = False   # the model takes ``reasoning_effort`` (OpenAI o-series / GPT-5, Gemini 2.5)

    @property
    def price_per_token(self) -> tuple[float, float] | None:
        if self.input_per_mtok is None or self.output_per_mtok is None:
            return None
        return self.input_per_mtok / _MTOK, self.output_per_mtok / _MTOK


_FIELDS = ("context_window", "max_output_tokens", "input_per_mtok", "output_per_mtok", "cache_read_per_mtok",
           "cache_write_per_mtok", "embedding", "reasoning")


class Catalogue:
    def __init__(self, data: dict[str, Any]):
        self.by_type: dict[str, dict[str, ModelInfo]] = {}
        self.names: dict[str, list[str]] = {}
        # provider type -> (family pattern, [(tier pattern, known model)]): see ``families`` in models.yaml
        self.families: dict[str, tuple[re.Pattern[str], list[tuple[re.Pattern[str], str]]]] = {}
        data = dict(data or {})
        families = data.pop("families", None) or {}
        for ptype, models in data.items():
            table: dict[str, ModelInfo] = {}
            names: list[str] = []
            for name, spec in (models or {}).items():
                spec = dict(spec or {})
                aliases = spec.pop("aliases", None) or []
                unknown = set(spec) - set(_FIELDS)
                if unknown:
                    raise ValueError(f"models.yaml: {ptype}.{name}: unknown keys {sorted(unknown)}")
                info = ModelInfo(name=name, provider_type=ptype, **spec)
                table[name] = info
                names.append(name)
                for a in aliases:
                    table[a] = info
            self.by_type[ptype] = table
            self.names[ptype] = names
        for ptype, fam in families.items():
            table = self.by_type.get(ptype) or {}
            tiers = []
            for pat, model in fam["tiers"]:
                if model not in table:
                    raise ValueError(f"models.yaml: families.{ptype}: {model!r} is not a known {ptype} model")
                tiers.append((re.compile(pat), model))
            self.families[ptype] = (re.compile(fam["match"]), tiers)

    def find(self, ptype: str, model: str) -> ModelInfo | None:
        tables = [self.by_type.get(ptype) or {}]
        if ptype == "openai_compatible":
            tables = list(self.by_type.values())
        for name in _candidates(model):
            for t in tables:
                info = t.get(name)
                if info is not None:
                    return info
        return None


    def family(self, ptype: str, model: str) -> ModelInfo | None:
        """A model of ``ptype``'s family (``claude-*`` for anthropic, ...) newer than the catalogue: the
        newest known model of its tier (opus / sonnet / haiku, gpt-5-mini, ...); None outside the family."""
        fam = self.families.get(ptype)
        if fam is None:
            return None
        m = model[7:] if model.startswith("models/") else model
        if not fam[0].match(m):
            return None
        for pat, known_model in fam[1]:
            if pat.search(m):
                return self.by_type[ptype][known_model]
        return None


def _candidates(model: str) -> list[str]:
    out = [model]
    m = model[7:] if model.startswith("models/") else model
    if m != model:
        out.append(m)
    seen = m
    while True:
        stripped = _SUFFIX.sub("", seen)
        if stripped == seen or not stripped:
            break
        out.append(stripped)
        seen = stripped
    return out


_catalogue: Catalogue | None = None


def catalogue() -> Catalogue:
    global _catalogue
    if _catalogue is None:
        text = resources.files("helixagent").joinpath("data/models.yaml").read_text("utf-8")
        _catalogue = Catalogue(yaml.safe_load(text))
    return _catalogue


def _cfg(provider_cfg: Any) -> Any:
    return getattr(provider_cfg, "cfg", provider_cfg)


_memo: dict[tuple[str, str, str], tuple[Any, ModelInfo | None]] = {}
_warned: set[tuple[str, str]] = set()


def _find(ptype: str, model: str) -> ModelInfo | None:
    """The catalogue entry, else (for a model newer than the catalogue) its family's, with a warning logged
    once per model: such a model is served and priced, never refused."""
    cat = catalogue()
    info = cat.find(ptype, model)
    if info is None:
        info = cat.family(ptype, model)
        if info is not None and (ptype, model) not in _warned:
            if len(_warned) < 4096:
                _warned.add((ptype, model))
            log.warning("model %r is not in the catalogue; served as a %s model and priced like %s (set "
                        "model_prices in the provider config for its own price)", model, ptype, info.name)
    return info


def lookup(provider_cfg: Any, model: str) -> ModelInfo | None:
    """Catalogue entry for ``model`` at this provider, with the provider's ``model_prices`` applied."""
    cfg = _cfg(provider_cfg)
    ptype = cfg.type or "openai"
    key = (cfg.name, ptype, model)
    overrides = cfg.model_prices
    hit = _memo.get(key)
    if hit is not None and hit[0] is overrides:
        return hit[1]
    info = _find(ptype, model)
    ov = overrides.get(model) if overrides else None
    if ov is None and overrides and info is not None:
        ov = overrides.get(info.name)
    if ov is not None:
        base = info or ModelInfo(name=model, provider_type=ptype)
        changes = {k: getattr(ov, k) for k in ("input_per_mtok", "output_per_mtok", "context_window")
                   if getattr(ov, k) is not None}
        from dataclasses import replace
        info = replace(base, **changes)
    if len(_memo) > 4096:
        _memo.clear()
    _memo[key] = (overrides, info)
    return info


def price(provider_cfg: Any, model: str) -> tuple[float, float] | None:
    """(input USD per token, output USD per token), or None when unknown."""
    info = lookup(provider_cfg, model)
    return info.price_per_token if info is not None else None


def context_window(provider_cfg: Any, model: str) -> int | None:
    info = lookup(provider_cfg, model)
    return info.context_window if info is not None else None


def max_output_tokens(provider_cfg: Any, model: str) -> int | None:
    info = lookup(provider_cfg, model)
    return info.max_output_tokens if info is not None else None


def estimate_cost(provider_cfg: Any, model: str, prompt_tokens: int, completion_tokens: int,
                  cache_read_tokens: int = 0, cache_creation_tokens: int = 0) -> float | None:
    """USD cost of a call, or None when the price is unknown.  Cached prompt tokens are charged at
    ``cache_read_per_mtok`` and cache writes at ``cache_write_per_mtok`` when the catalogue has them,
    otherwise at the input price."""
    info = lookup(provider_cfg, model)
    if info is None or info.input_per_mtok is None or info.output_per_mtok is None:
        return None
    cr = max(0, min(cache_read_tokens, prompt_tokens))
    cw = max(0, min(cache_creation_tokens, prompt_tokens - cr))
    plain = max(0, prompt_tokens - cr - cw)
    cost = plain * info.input_per_mtok + completion_tokens * info.output_per_mtok
    cost += cr * (info.cache_read_per_mtok if info.cache_read_per_mtok is not None else info.input_per_mtok)
    cost += cw * (info.cache_write_per_mtok if info.cache_write_per_mtok is not None else info.input_per_mtok)
    return cost / _MTOK


def models_for(provider_type: str | None) -> list[str]:
    """Catalogue model names for a provider type (aliases and snapshots are served but not listed)."""
    return list(catalogue().names.get(provider_type or "", ()))


def known(provider_type: str | None, model: str) -> bool:
    """Whether a provider of this type with no ``models:`` list serves ``model``: a catalogue model, or any
    model of the type's family (``claude-*``, ``gpt-*`` / ``o1*`` / ``o3*`` / ``o4*`` / ``chatgpt-*``,
    ``gemini-*``, ``deepseek-*``), so that a model newer than the catalogue is served, not a 404."""
    if provider_type == "openai_compatible":
        return False
    cat = catalogue()
    return cat.find(provider_type or "", model) is not None or cat.family(provider_type or "", model) is not None
