"""The shipped monitoring files: promtool validates and unit-tests the alert rules; every metric the
alerts and the Grafana dashboard use is one HelixAgent exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from conftest import IN_CI
from support.observability import FeatureStandIn, add_stage

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\bhelixagent_[a-z_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("promtool is not installed in CI (scripts/test-setup.sh installs the prometheus package)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(DEPLOY / "prometheus/alerts.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    r = subprocess.run([promtool(), "test", "rules", str(DEPLOY / "prometheus/alerts_test.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config():
    r = subprocess.run([promtool(), "check", "config", "--syntax-only", str(DEPLOY / "prometheus/prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _exported(make_gateway, fake_openai) -> set[str]:
    """The metric names a gateway exports once every kind of event has happened."""
    # max_concurrency: the provider's queue metrics (routing/queue.py) are exported too
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0, fallback_to=["backup"], max_concurrency=8),
                                     fake_openai.provider(max_retries=0, name="backup", priority=2)]})
    add_stage(gw, FeatureStandIn())

    class Limits:
        def budget_remaining(self):
            return {("application", "month"): 0.4}

    gw.app.services["limits"] = Limits()
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                              extra_headers={"x-test-cost": "0.1", "x-test-cache": "miss"})
    list(c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}], stream=True))
    from fakes.openai_upstream import Fault
    fake_openai.push(Fault(status=503))  # the primary fails, the backup answers: a fallback
    c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                                  extra_headers={"x-test-reject": "budget"})
    # retries are counted by the routing stage (ctx.retries); make one request carry one
    from helixagent.pipeline import Stage

    class OneRetry(Stage):
        async def post(self, ctx):
            if ctx.headers.get("x-test-retry"):
                ctx.retries = 1

    gw.app.chat_pipeline.stages.insert(1, OneRetry())
    c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                              extra_headers={"x-test-retry": "1"})
    # an ensemble request with one member left out (its upstream refuses): the helixagent_ensemble_* series
    fake_openai.push(Fault(status=400))
    c.post("/ensemble/completions", cast_to=object, body={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "a"}],
        "ensemble_config": {"providers": ["openai", "backup"], "strategy": "majority"}})
    text = httpx.get(gw.url + "/metrics").text
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_alerts_and_dashboard_use_exported_metrics(make_gateway, fake_openai):
    exported = _exported(make_gateway, fake_openai)
    exprs = []
    for group in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            exprs.append(rule["expr"])
    dash = json.loads((DEPLOY / "grafana/helixagent-dashboard.json").read_text())
    assert dash["panels"] and dash["uid"] == "helixagent"
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        exprs.extend(t["expr"] for t in panel["targets"])
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert {"helixagent_requests_total", "helixagent_request_duration_seconds_bucket", "helixagent_tokens_used_total",
            "helixagent_errors_total", "helixagent_provider_availability"} <= used
    missing = sorted(used - exported)
    assert not missing, f"used but not exported: {missing}"
    # the seed's alert, verbatim
    assert "rate(helixagent_errors_total[5m]) > 0.1" in exprs
