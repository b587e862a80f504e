"""The multi-instance suite, part 2: a provider failing on one instance is avoided by the others within one
breaker interval (the breaker state is in Redis: the others do not send it a single request once it
opened; routing/shared_health.py).  Part 3, cross-instance de-duplication: tests/test_scale_out_dedup.py.

Harness and fixtures: tests/support/cluster.py and tests/test_scale_out.py.
"""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from fakes.openai_upstream import Fault
from support.servers import wait_until
from test_scale_out import MODEL

pytest_plugins = ("support.cluster",)   # the fixtures pg_schema, make_cluster, two_upstreams

pytestmark = [pytest.mark.scale_out, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

FAILURES = 3          # routing.circuit_breaker.failure_threshold in these tests
COOLDOWN = "30s"      # long enough that no half-open probe happens during a test
# how long the other instances may take to see a breaker that opened elsewhere: "within one breaker
# interval" -- set to the shared breaker's own sync interval when it lands, if it has one
PROPAGATION = 1.0




def chat(url: str, key: str, text: str = "which provider answers", **params: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": text}], **params})


def breaker_state(url: str, key: str, provider: str) -> str:
    r = httpx.get(url + "/health", headers={"authorization": f"Bearer {key}"}, timeout=5)
    assert r.status_code == 200, r.text
    return str(r.json()["providers"][provider]["breaker"])


def test_a_provider_failing_on_one_instance_is_avoided_by_all(make_cluster, two_upstreams):
    primary, backup = two_upstreams
    primary.sticky = Fault(status=500)
    c = make_cluster([primary.provider("primary", priority=1, fallback_to=["backup"]),
                      backup.provider("backup", priority=2)],
                     config={"routing": {"circuit_breaker": {"failure_threshold": FAILURES, "cooldown": COOLDOWN,
                                                             "min_requests": 1000}}})
    key = c.master
    # instance 0 alone sees the failures: its breaker opens (each request falls back to the backup)
    for _ in range(FAILURES):
        r = chat(c.instance_url(0), key)
        assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "backup", r.text
    assert len(primary.calls) == FAILURES
    assert breaker_state(c.instance_url(0), key, "primary") == "open"
    # the others know within one breaker interval (/health shows the shared state)
    for i in (1, 2):
        assert wait_until(lambda i=i: breaker_state(c.instance_url(i), key, "primary") == "open",
                          timeout=PROPAGATION), i
    # ... and send it nothing: every request on instances 1 and 2 goes straight to the backup
    before = len(backup.calls)
    for i in (1, 2) * 5:
        r = chat(c.instance_url(i), key)
        assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "backup", r.text
    assert len(primary.calls) == FAILURES, "an instance called the provider whose breaker opened elsewhere"
    assert len(backup.calls) == before + 10
    # and through nginx alike
    for _ in range(6):
        assert chat(c.url, key).headers["x-helixagent-provider"] == "backup"
    assert len(primary.calls) == FAILURES
