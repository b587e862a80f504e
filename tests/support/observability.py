"""Helpers for the observability tests: parse Prometheus text, fake feature stages."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from helixagent.canonical import ChatResponse, Usage, new_completion
from helixagent.errors import GatewayError
from helixagent.pipeline import Stage


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def label_values(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], label: str) -> set[str]:
    return {v for (_, ls) in samples for (k, v) in ls if k == label}


class FeatureStandIn(Stage):
    """Plays the parts later stages play in the pipeline contract, driven by request headers:
    ``x-test-reject: rate|budget`` raises the limit stage's 429; ``x-test-cache: hit|miss`` sets the cache
    status (a hit answers from 'cache'); ``x-test-cost: 0.25`` sets the cost as the record stage would."""

    name = "stand-in"

    async def pre(self, ctx: Any) -> bool:
        h = ctx.headers
        rej = h.get("x-test-reject")
        if rej:
            code = "budget_exceeded" if rej == "budget" else "rate_limit_exceeded"
            raise GatewayError(429, f"test {rej} limit", code=code, type="rate_limit_error", retry_after=1,
                               kind="rate_limited")
        cache = h.get("x-test-cache")
        if cache:
            ctx.cache_status = cache
            if cache == "hit":
                usage = Usage(7, 3, 10)
                body = new_completion("chatcmpl-cached", "gpt-4o-mini", {"role": "assistant", "content": "cached"},
                                      "stop", usage)
                ctx.response = ChatResponse(body, usage, "openai", "gpt-4o-mini")
                ctx.provider = "openai"
                ctx.upstream_model = "gpt-4o-mini"
                return True
        return False

    async def post(self, ctx: Any) -> None:
        cost = ctx.headers.get("x-test-cost")
        if cost and ctx.error is None:
            ctx.cost = float(cost)


def add_stage(gw: Any, stage: Stage) -> None:
    """Append a stage to a running gateway's pipelines (after the built-in ones)."""
    gw.app.chat_pipeline.stages.append(stage)
    gw.app.embed_pipeline.stages.append(stage)
