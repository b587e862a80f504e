"""The panel a request asks for: an ``EnsembleConfig`` (a named ``ensembles:`` entry or a request's
``ensemble_config``) resolved against the configured providers into members, a judge and the strategy's knobs.

Every problem is a 400 naming the parameter (``ensemble_config.providers[1]``; ``model`` for a named
ensemble, whose config was checked at start-up)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..api.schemas.base import error_from
from ..config import EnsembleConfig
from ..errors import GatewayError, bad_request
from ..routing.router import Router

PREFIX = "ensemble/"


@dataclass(slots=True)
class Member:
    index: int
    provider: str
    model: str
    weight: float = 1.0
    wire: str = "openai"

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(slots=True)
class Spec:
    name: str | None                 # the configured ensemble's name; None for an inline ensemble_config
    strategy: str
    members: list[Member]
    min_providers: int
    threshold: float
    fallback_to_best: bool
    preferred: list[str]
    judge: Member | None
    judge_mode: str
    rounds: int
    close: str                       # debate: "vote" or "judge"
    timeout: float                   # seconds (panel_timeout_ms)
    param: str = "ensemble_config"   # what errors name

    @property
    def label(self) -> str:
        return PREFIX + self.name if self.name else "ensemble"

    @property
    def uses_judge(self) -> bool:
        """Whether the decision is the judge's: strategy ``judge``, or a debate closed by the judge."""
        return self.judge is not None and (self.strategy == "judge"
                                           or (self.strategy == "debate" and self.close == "judge"))


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    ensemble_config: EnsembleConfig


def check_edge(data: Any) -> EnsembleConfig:
    """A request's ``ensemble_config``, strictly typed (no coercion), or a 400 naming the field."""
    body = {"ensemble_config": data}
    try:
        return _Body.model_validate(body, strict=True).ensemble_config
    except ValidationError as exc:
        raise error_from(exc, body) from None


def _bad(msg: str, param: str, code: str = "invalid_value") -> GatewayError:
    return bad_request(msg, param=param, code=code)


def resolve(ec: EnsembleConfig, router: Router, request_model: str, name: str | None = None) -> Spec:
    """The panel of ``ec`` on this gateway's providers; a 400 naming the parameter for anything that
    cannot be served."""
    param = "model" if name is not None else "ensemble_config"
    providers = router.providers

    def member_model(pname: str, model: str | None, where: str) -> tuple[str, str]:
        p = providers.get(pname)
        if p is None or not p.cfg.enabled:
            raise _bad(f"'{where}': provider {pname!r} is not configured (configured: "
                       f"{', '.join(providers) or 'none'})", where if name is None else param, "provider_not_found")
        if model:
            return pname, model
        if request_model and not request_model.startswith(PREFIX) and p.serves(request_model):
            return pname, request_model
        ms = p.models()
        if not ms:
            raise _bad(f"'{where}': provider {pname!r} has no models configured; name the member's model",
                       where if name is None else param, "model_required")
        return pname, ms[0]

    pairs: list[tuple[str, str, float]] = []
    if ec.members:
        for i, m in enumerate(ec.members):
            pn, mn = member_model(m.provider, m.model, f"{param}.members[{i}].provider")
            pairs.append((pn, mn, m.weight))
    elif ec.providers:
        if ec.models and len(ec.models) != len(ec.providers):
            raise _bad(f"'{param}.models' names {len(ec.models)} models for {len(ec.providers)} providers; give one "
                       "model per provider, or none", f"{param}.models")
        for i, pn in enumerate(ec.providers):
            pn, mn = member_model(pn, ec.models[i] if ec.models else None, f"{param}.providers[{i}]")
            pairs.append((pn, mn, ec.weights.get(pn, 1.0)))
    elif ec.models:
        for i, mn in enumerate(ec.models):
            try:
                c = router.candidates(mn, None)[0]
            except (GatewayError, IndexError):
                raise _bad(f"'{param}.models[{i}]': no configured provider serves model {mn!r}",
                           f"{param}.models[{i}]" if name is None else param, "model_not_found") from None
            pairs.append((c.provider.name, c.model, ec.weights.get(c.provider.name, 1.0)))
    if not pairs:
        raise _bad(f"'{param}': the panel is empty; name its members with 'providers', 'models' or 'members'",
                   f"{param}.providers" if name is None else param, "missing_required_parameter")
    seen: set[tuple[str, str]] = set()
    members: list[Member] = []
    for pn, mn, w in pairs:
        if (pn, mn) in seen:
            raise _bad(f"'{param}': {pn}/{mn} is in the panel twice", param)
        seen.add((pn, mn))
        members.append(Member(len(members), pn, mn, w, providers[pn].cfg.wire))
    if ec.min_providers > len(members):
        raise _bad(f"'{param}.min_providers' is {ec.min_providers} but the panel has {len(members)} members",
                   f"{param}.min_providers")
    for i, pn in enumerate(ec.preferred_providers):
        if pn not in providers:
            raise _bad(f"'{param}.preferred_providers[{i}]': provider {pn!r} is not configured",
                       f"{param}.preferred_providers[{i}]", "provider_not_found")
    judge: Member | None = None
    if ec.judge is not None:
        pn, mn = member_model(ec.judge.provider, ec.judge.model, f"{param}.judge.provider")
        judge = Member(-1, pn, mn, 1.0, providers[pn].cfg.wire)
    close = ec.debate_close or ("judge" if judge is not None else "vote")
    if judge is None and (ec.strategy == "judge" or (ec.strategy == "debate" and close == "judge")):
        raise _bad(f"'{param}.judge' is required by strategy {ec.strategy!r}"
                   + (" with debate_close 'judge'" if ec.strategy == "debate" else ""), f"{param}.judge",
                   "missing_required_parameter")
    return Spec(name, ec.strategy, members, ec.min_providers, ec.confidence_threshold, ec.fallback_to_best,
                list(ec.preferred_providers), judge, ec.judge_mode, ec.rounds if ec.strategy == "debate" else 1,
                close, ec.panel_timeout_ms / 1000.0, param)
