"""Ensemble metrics, on the gateway's Prometheus registry (labels from fixed sets only)."""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

from ..observability.metrics import DURATION_BUCKETS

STRATEGIES = ("majority", "confidence_weighted", "quality_weighted", "judge", "debate")
DECISIONS = ("majority", "quality", "confidence", "fallback_to_best", "tie_preferred", "tie_health",
             "tie_panel_order", "judge_synthesis", "judge_pick", "judge_failed_vote", "judge_unparsed_vote", "error")
LEFT_OUT = ("failed", "timeout", "cancelled")


class EnsembleMetrics:
    def __init__(self, registry: Any):
        self.requests = Counter("helixagent_ensemble_requests", "Ensemble requests by strategy and decision",
                                ("strategy", "decision"), registry=registry)
        self.panel = Histogram("helixagent_ensemble_panel_size", "Members in the panel of an ensemble request",
                               ("strategy",), buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16), registry=registry)
        self.agreement = Histogram("helixagent_ensemble_agreement_ratio",
                                   "Share of the answering members that agree with the winner",
                                   ("strategy",), buckets=(0.2, 0.34, 0.5, 0.67, 0.75, 0.99, 1.0), registry=registry)
        self.latency = Histogram("helixagent_ensemble_decision_seconds",
                                 "From the ensemble request's arrival to its decision", ("strategy",),
                                 buckets=DURATION_BUCKETS, registry=registry)
        self.cost = Counter("helixagent_ensemble_cost_dollars", "Cost of ensemble requests (every call in them)",
                            ("strategy",), registry=registry)
        self.left_out = Counter("helixagent_ensemble_members_left_out", "Member calls left out of a decision",
                                ("strategy", "reason"), registry=registry)

    def observe(self, strategy: str, decision: str, panel: int, agreement: float | None, latency: float | None,
                cost: float, left_out: list[str]) -> None:
        s = strategy if strategy in STRATEGIES else "majority"
        self.requests.labels(s, decision if decision in DECISIONS else "error").inc()
        self.panel.labels(s).observe(panel)
        if agreement is not None:
            self.agreement.labels(s).observe(agreement)
        if latency is not None:
            self.latency.labels(s).observe(latency)
        if cost:
            self.cost.labels(s).inc(cost)
        for r in left_out:
            self.left_out.labels(s, r if r in LEFT_OUT else "failed").inc()
