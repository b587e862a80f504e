"""The votes' pieces in-process: grouping, agreement, settled(), and the tie-break's health score reading
the fleet's error rate when routing.shared_health merged one in (the same source as Health.score)."""
from __future__ import annotations

from helixagent.canonical import ChatResponse, Usage
from helixagent.config import BreakerConfig
from helixagent.ensemble import strategies
from helixagent.ensemble.answers import ANSWERED, Answer
from helixagent.ensemble.spec import Member, Spec
from helixagent.routing.health import Health


def _answer(i: int, provider: str, text: str) -> Answer:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
    return Answer(Member(i, provider, f"{provider}-model"), ANSWERED, response=ChatResponse(body, Usage(), provider, "m"))


def _spec(strategy: str = "majority", members: int = 3, min_providers: int = 1) -> Spec:
    return Spec(None, strategy, [Member(i, p, f"{p}-model") for i, p in enumerate("abc"[:members])], min_providers,
                0.0, True, [], None, "synthesis", 1, "vote", 5.0)


def test_groups_and_agreement_compare_normalised_answers():
    ok = [_answer(0, "a", "Paris"), _answer(1, "b", "  paris "), _answer(2, "c", "Lyon")]
    g = strategies.groups(ok)
    assert sorted(len(v) for v in g.values()) == [1, 2]
    assert all(a.key is not None for a in ok)
    assert strategies.agreement(ok) == 2 / 3
    assert strategies.agreement([]) == 0.0


def test_settled_when_the_pending_answers_cannot_overturn_the_lead():
    spec = _spec()
    two = [_answer(0, "a", "Paris"), _answer(1, "b", "paris")]
    assert strategies.settled(two, 1, spec)          # 2 agree, 1 still out: cannot be out-voted
    split = [_answer(0, "a", "Paris"), _answer(1, "b", "Lyon")]
    assert not strategies.settled(split, 1, spec)    # 1 : 1 with one to come
    assert strategies.settled(split, 0, spec)        # everyone is in


def test_tie_break_health_score_uses_the_fleets_error_rate_when_shared():
    health = Health(BreakerConfig(), ["a", "b"])
    spec = _spec(members=2)
    # locally "a" looks healthier, but the fleet has seen it fail half the time
    health.get("a").err_ewma, health.get("b").err_ewma = 0.0, 0.1
    assert strategies.health_score(health, "a") > strategies.health_score(health, "b")
    health.get("a").fleet_err = 0.5
    assert strategies.health_score(health, "a") == 0.5
    d = strategies.decide([_answer(0, "a", "Paris"), _answer(1, "b", "Lyon")], spec, health)
    assert d.decision == "tie_health" and d.winner.member.provider == "b"
    health.get("a").fleet_err = None  # shared health went local-only again: the local EWMA counts
    d = strategies.decide([_answer(0, "a", "Paris"), _answer(1, "b", "Lyon")], spec, health)
    assert d.winner.member.provider == "a"
