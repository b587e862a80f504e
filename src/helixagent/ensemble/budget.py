"""The worst case an ensemble request may spend, reserved against the caller's token and dollar budgets
before any member is called (limits stage, ``ctx.state["reserve"]``).

Every call it may make is counted at its own provider's price: one per member per debate round (a later
round's prompt holds the other members' answers), plus the judge's (the prompt and every candidate).  A
completion is ``max_tokens`` (``max_completion_tokens``), else ``rate_limits.default_completion_tokens``."""
from __future__ import annotations

from typing import Callable

from ..canonical import ChatRequest
from ..errors import GatewayError
from ..tokens import estimate_messages
from .spec import Member, Spec

OVERHEAD = 120  # the judge's / a debate round's own instructions, generously


def planned_calls(spec: Spec, req: ChatRequest, default_completion: int) -> list[tuple[Member, int, int]]:
    """(member, prompt tokens, completion tokens) of every call the ensemble may make."""
    prompt = estimate_messages(req.messages, req.params.get("tools"))
    mt = req.max_tokens
    comp = mt if mt is not None else default_completion
    n = len(spec.members)
    out: list[tuple[Member, int, int]] = [(m, prompt, comp) for m in spec.members]
    for _ in range(2, spec.rounds + 1):
        out.extend((m, prompt + n * comp + OVERHEAD, comp) for m in spec.members)
    if spec.uses_judge:
        assert spec.judge is not None
        out.append((spec.judge, prompt + n * comp + OVERHEAD, comp))
    return out


def worst_case(spec: Spec, req: ChatRequest, price_of: Callable[[str, str], tuple[float, float] | None],
               default_completion: int, need_usd: bool) -> tuple[int, float]:
    """(tokens, dollars): for the limits stage (``price_of`` = the limiter's prices), and as reported in the
    ``ensemble`` object.  A call the gateway cannot price is a 400 when the caller has a dollar budget
    (``rate_limits.unknown_price: reject``), as for a single request."""
    tokens = 0
    dollars = 0.0
    for m, p, c in planned_calls(spec, req, default_completion):
        tokens += p + c
        price = price_of(m.provider, m.model)
        if price is None:
            if not need_usd:
                continue  # no dollar budget: an unknown price is only left out of the reported estimate
            raise GatewayError(400, f"ensemble member {m.label} has no known price, and this API key has a dollar "
                                    "budget: a call it cannot price cannot be counted against the budget (set "
                                    "model_prices for it, or rate_limits.unknown_price: default)",
                               type="invalid_request_error", param=spec.param, code="model_price_unknown",
                               kind="model_price_unknown")
        dollars += price[0] * p + price[1] * c
    return tokens, dollars
