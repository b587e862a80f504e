"""Running one ensemble request: the panel (one round, or a debate's rounds), then the decision (a vote or
the judge), and the ``ensemble`` object the caller sees."""
from __future__ import annotations

import time
from typing import Any

from ..canonical import ChatRequest, ChatResponse
from ..errors import GatewayError
from ..routing.health import Health
from . import strategies
from .answers import ANSWERED, Answer
from .debate import revise_request
from .judge import judge_request, parse_pick
from .panel import Calls, member_request, run_panel
from .spec import Member, Spec
from .strategies import Decision

VOTES = ("majority", "confidence_weighted", "quality_weighted")


class Engine:
    def __init__(self, spec: Spec, req: ChatRequest, calls: Calls, health: Health):
        self.spec = spec
        self.req = req
        self.calls = calls
        self.health = health
        self.started = time.perf_counter()
        self.final: list[Answer] = []
        self.judge: Answer | None = None
        self.judge_reason: str | None = None
        self.judge_note: str | None = None
        self.decided_at: float | None = None
        self.decision: Decision | None = None

    # -- the panel -----------------------------------------------------------------------------------
    async def panel(self) -> list[Answer]:
        """The answers of the last round (answered ones first in panel order); a 502 when fewer than
        ``min_providers`` members answered."""
        spec = self.spec
        settle = (lambda res, pending: strategies.settled(res, pending, spec)) if spec.strategy == "majority" else None
        res = await run_panel(self.calls, spec, spec.members, lambda m: member_request(self.req, m, spec), 1, settle)
        self._check(res, 1)
        for rnd in range(2, spec.rounds + 1):
            prev = {a.member.index: a for a in res if a.ok}

            def revise(m: Member, prev: dict[int, Answer] = prev, rnd: int = rnd) -> ChatRequest:
                others = [a for i, a in sorted(prev.items()) if i != m.index]
                return revise_request(self.req, prev[m.index], others, rnd, spec.rounds)

            res = await run_panel(self.calls, spec, [prev[i].member for i in sorted(prev)], revise, rnd)
            self._check(res, rnd)
        self.final = res
        return res

    def _check(self, res: list[Answer], rnd: int) -> None:
        ok = [a for a in res if a.ok]
        if len(ok) >= self.spec.min_providers and ok:
            return
        out = "; ".join(f"{a.member.label}: {a.reason}" for a in res if not a.ok)
        where = f" in debate round {rnd}" if self.spec.strategy == "debate" else ""
        raise GatewayError(502, f"ensemble: {len(ok)} of {len(res)} members answered{where}, fewer than "
                                f"min_providers ({self.spec.min_providers}); left out: {out or 'none'}",
                           type="server_error", code="ensemble_min_providers", kind="ensemble_min_providers")

    # -- the decision --------------------------------------------------------------------------------
    def vote(self, answers: list[Answer]) -> Decision:
        strategy = self.spec.strategy if self.spec.strategy in VOTES else "majority"
        d = strategies.decide(answers, self.spec, self.health, strategy)
        self.decided_at = time.perf_counter()
        return d

    def judge_call(self, answers: list[Answer]) -> tuple[ChatRequest, Member]:
        j = self.spec.judge
        assert j is not None
        return judge_request(self.req, [a for a in answers if a.ok], self.spec.judge_mode, j.model, j.provider), j

    async def decide(self, answers: list[Answer]) -> Decision:
        """The decision without streaming: a vote, or the judge's synthesis / pick (a failed judge, or a pick
        that names no candidate, falls back to the majority vote and says so)."""
        if not self.spec.uses_judge:
            return self.vote(answers)
        jreq, jm = self.judge_call(answers)
        ans = await self.calls.call(jreq, jm)
        self.judge = ans
        ok = [a for a in answers if a.ok]
        if not ans.ok:
            self.judge_note = f"the judge {ans.reason}; decided by majority vote"
            d = self.vote(answers)
            d.decision = "judge_failed_vote"
            return d
        if self.spec.judge_mode == "pick":
            got = parse_pick(ans.text, len(ok))
            if got is None:
                self.judge_note = "the judge named no candidate; decided by majority vote"
                d = self.vote(answers)
                d.decision = "judge_unparsed_vote"
                return d
            idx, reason = got
            self.judge_reason = reason
            self.decided_at = time.perf_counter()
            grouped = strategies.groups(ok)  # (sets every answer's key)
            w = ok[idx]
            assert w.key is not None
            agree = len(grouped[w.key]) / len(ok)
            return Decision(w, "judge_pick", agree, {}, reason=reason)
        self.decided_at = time.perf_counter()
        return Decision(ans, "judge_synthesis", strategies.agreement(ok), {}, message=ans.message)


def _usage(a: Answer) -> dict[str, Any] | None:
    return a.usage.to_openai() if a.usage is not None else None


def _member(a: Answer, d: Decision | None) -> dict[str, Any]:
    out: dict[str, Any] = {"provider": a.member.provider, "model": a.member.model, "round": a.round,
                           "status": a.status, "request_id": a.request_id, "latency_ms": round(a.latency * 1000, 1),
                           "usage": _usage(a), "cost": a.cost}
    if a.ok:
        out["answer"] = a.summary()
        if a.confidence is not None:
            out["confidence"] = round(a.confidence, 6)
        if a.score is not None:
            out["score"] = round(a.score, 6)
        if d is not None and a.member.label in d.votes:
            out["votes"] = d.votes[a.member.label]
        out["winner"] = d is not None and a is d.winner
    else:
        out["reason"] = a.reason
        if a.error is not None:
            out["error"] = {"status": a.error.status, "code": a.error.code, "message": a.error.message[:300]}
    return out


def describe(eng: Engine, ctx_id: str, d: Decision | None, reserved: tuple[int, float] | None,
             error: GatewayError | None = None) -> dict[str, Any]:
    """The ``ensemble`` object of the response (and of the final stream chunk)."""
    spec = eng.spec
    calls = eng.calls
    members = [a for a in calls.all if a is not eng.judge]
    members.sort(key=lambda a: (a.round, a.member.index))
    answered = [a for a in eng.final if a.ok]
    out: dict[str, Any] = {
        "id": ctx_id, "name": spec.name, "strategy": spec.strategy,
        "decision": d.decision if d is not None else "error",
        "panel_size": len(spec.members), "answered": len(answered), "min_providers": spec.min_providers,
        "members": [_member(a, d) for a in members],
        "left_out": [{"provider": a.member.provider, "model": a.member.model, "round": a.round,
                      "reason": a.reason} for a in members if a.status != ANSWERED],
    }
    if spec.strategy == "debate":
        out["rounds"] = spec.rounds
    if d is not None:
        w = d.winner
        out["winner"] = ({"provider": w.member.provider, "model": w.member.model, "index": w.member.index}
                         if w is not eng.judge else {"provider": w.member.provider, "model": w.member.model,
                                                     "judge": True})
        out["agreement"] = round(d.agreement, 6)
        if d.confidence is not None:
            out["confidence"] = round(d.confidence, 6)
            out["confidence_threshold"] = spec.threshold
    if spec.judge is not None and spec.uses_judge:
        j: dict[str, Any] = {"provider": spec.judge.provider, "model": spec.judge.model, "mode": spec.judge_mode}
        if eng.judge is not None:
            j.update(status=eng.judge.status, request_id=eng.judge.request_id,
                     latency_ms=round(eng.judge.latency * 1000, 1), usage=_usage(eng.judge), cost=eng.judge.cost)
            if not eng.judge.ok:
                j["reason_left_out"] = eng.judge.reason
        if eng.judge_reason is not None:
            j["reason"] = eng.judge_reason
        if eng.judge_note is not None:
            j["note"] = eng.judge_note
        out["judge"] = j
    u = calls.usage
    out["usage"] = u.to_openai()
    out["cost"] = round(calls.cost, 10)
    if reserved is not None:
        out["reserved"] = {"tokens": reserved[0], "cost": round(reserved[1], 10)}
    if eng.decided_at is not None:
        out["decision_latency_ms"] = round((eng.decided_at - eng.started) * 1000, 1)
    if error is not None:
        out["error"] = {"status": error.status, "code": error.code, "message": error.message[:500]}
    return out


def combined_body(eng: Engine, d: Decision, ctx_id: str, created: int, keep_logprobs: bool) -> dict[str, Any]:
    """The chat.completion the caller gets: the winner's (or the judge's) message, the panel's usage."""
    w = d.winner
    assert w.response is not None
    src = w.response.body
    ch0 = (src.get("choices") or [{}])[0]
    msg = dict(d.message if d.message is not None else (ch0.get("message") or {"role": "assistant", "content": ""}))
    msg.setdefault("role", "assistant")
    body: dict[str, Any] = {
        "id": f"chatcmpl-{ctx_id}", "object": "chat.completion", "created": created, "model": eng.spec.label,
        "choices": [{"index": 0, "message": msg, "logprobs": ch0.get("logprobs") if keep_logprobs else None,
                     "finish_reason": ch0.get("finish_reason") or "stop"}],
        "usage": eng.calls.usage.to_openai()}
    return body


def response_of(body: dict[str, Any], eng: Engine, d: Decision) -> ChatResponse:
    w = d.winner
    return ChatResponse(body, eng.calls.usage, w.member.provider, w.member.model)
