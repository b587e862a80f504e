"""Combining a panel's answers: majority, confidence_weighted and quality_weighted votes.

Every vote groups the answers by their normalised form (answers.normalise) and scores each group:

* ``majority`` -- one vote per answer; a tie is broken by ``preferred_providers`` (the group holding the
  provider named first), then by the members' live health score (breaker availability x (1 - error rate));
* ``confidence_weighted`` -- each answer weighs its confidence: exp(mean token logprob) when the provider
  returned logprobs, else the member's configured weight (capped at 1).  The winner's confidence is its group's
  confidence sum divided by the number of answers; below ``confidence_threshold`` the best single answer
  wins with ``fallback_to_best`` (decision ``fallback_to_best``), else the request fails (422);
* ``quality_weighted`` -- each answer weighs member weight x health score x a latency factor
  ((fastest latency / its latency) ** 0.25, within this panel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import GatewayError
from ..routing.health import Health
from .answers import Answer, normalise
from .spec import Spec


@dataclass(slots=True)
class Decision:
    winner: Answer
    decision: str                     # majority | tie_preferred | tie_health | confidence | fallback_to_best | ...
    agreement: float                  # share of the answers that agree with the winner
    votes: dict[str, float] = field(default_factory=dict)   # member label -> its group's score
    confidence: float | None = None
    reason: str | None = None         # the judge's reason (pick)
    message: dict[str, Any] | None = None   # a judge's synthesis (else the winner's message)


def health_score(health: Health, provider: str) -> float:
    """Breaker availability x (1 - error rate); the error rate is the fleet's when routing.shared_health is
    on (``ProviderHealth.error_ewma``, as ``Health.score`` and the router read it)."""
    h = health.get(provider)
    return h.availability() * (1.0 - min(1.0, max(0.0, h.error_ewma())))


def groups(answers: list[Answer]) -> dict[str, list[Answer]]:
    """The answers by their normalised form (each answer's ``key`` is set on the way)."""
    out: dict[str, list[Answer]] = {}
    for a in answers:
        if a.key is None:
            a.key = normalise(a.message)
        out.setdefault(a.key, []).append(a)
    return out


def agreement(ok: list[Answer]) -> float:
    """The share of the answers ``ok`` that agree with the largest group (0 for none)."""
    return max(len(g) for g in groups(ok).values()) / len(ok) if ok else 0.0


def _pick_group(groups: dict[str, list[Answer]], scores: dict[str, float], spec: Spec,
                health: Health) -> tuple[str, str]:
    """(winning key, how it was decided) -- ties by preferred_providers, then health, then panel order."""
    best = max(scores.values())
    tied = [k for k, s in scores.items() if abs(s - best) < 1e-12]
    if len(tied) == 1:
        return tied[0], "vote"
    pref = spec.preferred
    if pref:
        def rank(k: str) -> int:
            return min((pref.index(a.member.provider) for a in groups[k] if a.member.provider in pref),
                       default=len(pref))
        ranked = sorted(tied, key=rank)
        if rank(ranked[0]) < len(pref) and (len(ranked) < 2 or rank(ranked[0]) < rank(ranked[1])):
            return ranked[0], "tie_preferred"

    def hscore(k: str) -> float:
        return max(health_score(health, a.member.provider) for a in groups[k])
    ranked = sorted(tied, key=lambda k: (-hscore(k), min(a.member.index for a in groups[k])))
    return ranked[0], "tie_health" if hscore(ranked[0]) != hscore(ranked[1]) else "tie_panel_order"


def _best_in(group: list[Answer]) -> Answer:
    return max(group, key=lambda a: ((a.score if a.score is not None else 0.0), -a.member.index))


def decide(answers: list[Answer], spec: Spec, health: Health, strategy: str | None = None) -> Decision:
    """The winner among the answered members (at least one)."""
    strategy = strategy or spec.strategy
    ok = [a for a in answers if a.ok]
    assert ok, "a decision needs an answer"
    grouped = groups(ok)
    if strategy == "confidence_weighted":
        for a in ok:
            a.score = a.confidence if a.confidence is not None else min(1.0, a.member.weight)
    elif strategy == "quality_weighted":
        fastest = min(a.latency for a in ok) or 1e-3
        for a in ok:
            lat = max(a.latency, 1e-3)
            a.score = a.member.weight * health_score(health, a.member.provider) * (fastest / lat) ** 0.25
    else:  # majority (and the vote that closes a debate or replaces a failed judge)
        for a in ok:
            a.score = 1.0
    scores = {k: sum(a.score or 0.0 for a in g) for k, g in grouped.items()}
    key, how = _pick_group(grouped, scores, spec, health)
    group = grouped[key]
    votes = {a.member.label: round(scores[a.key], 6) for a in ok if a.key is not None}
    agreement = len(group) / len(ok)
    if strategy == "confidence_weighted":
        conf = scores[key] / len(ok)
        winner = _best_in(group)
        if conf + 1e-12 < spec.threshold:
            if not spec.fallback_to_best:
                raise GatewayError(422, "no answer reached the confidence threshold: the best agreement has "
                                   f"confidence {conf:.3f} < confidence_threshold {spec.threshold:g} (and "
                                   "fallback_to_best is false)",
                                   code="ensemble_low_confidence", param=f"{spec.param}.confidence_threshold",
                                   kind="ensemble_low_confidence")
            best = max(ok, key=lambda a: (a.score or 0.0, -a.member.index))
            assert best.key is not None
            return Decision(best, "fallback_to_best", len(grouped[best.key]) / len(ok), votes, best.score)
        return Decision(winner, "confidence" if how == "vote" else how, agreement, votes, round(conf, 6))
    winner = _best_in(group) if strategy == "quality_weighted" else min(group, key=lambda a: a.member.index)
    if how == "vote":
        how = "majority" if strategy != "quality_weighted" else "quality"
    return Decision(winner, how, agreement, votes)


def settled(answers: list[Answer], pending: int, spec: Spec) -> bool:
    """True when the answers in can no longer be out-voted by the ``pending`` ones (majority only: the other
    strategies weigh every answer, so they wait for the whole panel or its timeout)."""
    if spec.strategy != "majority" or pending == 0:
        return pending == 0
    ok = [a for a in answers if a.ok]
    if len(ok) < spec.min_providers:
        return False
    top = sorted((len(g) for g in groups(ok).values()), reverse=True)
    second = top[1] if len(top) > 1 else 0
    return top[0] > second + pending
