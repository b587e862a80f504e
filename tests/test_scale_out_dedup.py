"""The multi-instance suite, part 3: identical concurrent requests sent to all three instances reach the
upstream once (in-flight de-duplication across instances, through Redis).

Harness and fixtures: tests/support/cluster.py, tests/test_scale_out.py, tests/test_scale_out_shared.py.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from fakes.openai_upstream import Fault
from test_scale_out import MODEL

pytest_plugins = ("support.cluster",)   # the fixtures pg_schema, make_cluster, two_upstreams

pytestmark = [pytest.mark.scale_out, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]




def test_identical_concurrent_requests_on_three_instances_reach_the_upstream_once(make_cluster, two_upstreams):
    upstream, _ = two_upstreams
    upstream.sticky = Fault(delay=1.0)            # the leader's call is in flight while the others arrive
    c = make_cluster([upstream.provider()], config={"cache": {"enabled": True, "type": "redis", "dedupe": True}})
    key = c.master

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return list(await asyncio.gather(*(
                client.post(c.instance_url(i % 3) + "/v1/chat/completions",
                            headers={"authorization": f"Bearer {key}"},
                            json={"model": MODEL, "temperature": 0,
                                  "messages": [{"role": "user", "content": "the same question everywhere"}]})
                for i in range(9))))

    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 9, [r.text for r in rs if r.status_code != 200]
    assert len({r.json()["choices"][0]["message"]["content"] for r in rs}) == 1
    assert len(upstream.calls) == 1, f"{len(upstream.calls)} upstream calls for 9 identical requests on 3 instances"
    # the same through nginx, streamed and not: still the one stored answer
    for stream in (False, True):
        r = httpx.post(c.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": MODEL, "temperature": 0, "stream": stream,
                             "messages": [{"role": "user", "content": "the same question everywhere"}]})
        assert r.status_code == 200
    assert len(upstream.calls) == 1
