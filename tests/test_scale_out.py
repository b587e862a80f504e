"""The multi-instance suite: three `helixagent serve` processes behind a real nginx (least_conn), sharing
the CI PostgreSQL (a schema per test) and Redis (a key prefix per test); see tests/support/cluster.py.

1. load through nginx while instance 1 is SIGKILLed and restarted: every answer the client saw complete
   has exactly one completion record, no record is duplicated (nginx never replays a POST it already
   sent), and the only failures are requests that were on the killed instance;
2. limits hold exactly across the three: rpm N -> exactly N admitted of 5N concurrent, the rest 429 with
   Retry-After; a token budget likewise;
3. SIGTERM one instance with streams in flight: they finish, new requests go to the others, zero failures.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from fakes.openai_upstream import Fault
from support.servers import wait_until

from helixagent.tokens import estimate_messages

if TYPE_CHECKING:   # imported by pytest_plugins below (so that pytest rewrites its asserts)
    from support.cluster import Cluster

pytest_plugins = ("support.cluster",)   # the fixtures pg_schema, upstream, make_cluster
pytestmark = [pytest.mark.scale_out, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

MODEL = "gpt-4o-mini"
_ids = itertools.count()


class Outcome:
    __slots__ = ("cid", "stream", "ok", "status", "rid", "detail", "t0", "t1")

    def __init__(self, cid: str, stream: bool) -> None:
        self.cid, self.stream = cid, stream
        self.ok, self.status, self.rid, self.detail = False, 0, None, ""
        self.t0 = self.t1 = 0.0

    def __repr__(self) -> str:
        return f"<{self.cid} stream={self.stream} ok={self.ok} {self.status} {self.detail[:120]}>"


async def one_request(client: httpx.AsyncClient, url: str, stream: bool, headers: dict[str, str] | None = None,
                      text: str = "tell me about the cluster") -> Outcome:
    """POST one chat completion; ``ok`` only for a 200 with a full body, or a stream ending in [DONE]."""
    cid = f"so-{next(_ids)}-{time.monotonic_ns() % 10**9}"
    out = Outcome(cid, stream)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}
    h = {"x-request-id": cid, **(headers or {})}
    out.t0 = time.monotonic()
    try:
        if not stream:
            r = await client.post(url + "/v1/chat/completions", json=body, headers=h)
            out.status, out.rid = r.status_code, r.headers.get("x-helixagent-request-id")
            if r.status_code == 200:
                msg = orjson.loads(r.content)["choices"][0]["message"]
                out.ok = bool(msg.get("content"))
            else:
                out.detail = r.text
        else:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=h) as r:
                out.status, out.rid = r.status_code, r.headers.get("x-helixagent-request-id")
                lines = [ln async for ln in r.aiter_lines() if ln]
                out.ok = r.status_code == 200 and bool(lines) and lines[-1] == "data: [DONE]"
                if not out.ok:
                    out.detail = "\n".join(lines[-3:])
    except (httpx.HTTPError, orjson.JSONDecodeError, KeyError, IndexError) as exc:
        out.detail = f"{type(exc).__name__}: {exc}"
    out.t1 = time.monotonic()
    return out


def wait_records(c: Cluster, cids: list[str], timeout: float = 30) -> list[dict[str, Any]]:
    """The records of these client request ids, once every one is in the database (or the timeout)."""
    want = set(cids)
    rows: list[dict[str, Any]] = []

    def have() -> bool:
        nonlocal rows
        rows = c.records("WHERE client_request_id = ANY(%(ids)s)", {"ids": list(want)})
        return want <= {r["client_request_id"] for r in rows}
    wait_until(have, timeout=timeout, interval=0.2)
    return rows


def test_sigkill_and_restart_mid_load_loses_no_record(make_cluster, upstream):
    """400+ requests, 24 concurrent clients, half streamed; instance 1 is SIGKILLed once 120 have completed
    and restarted at once (its spool kept), while the load goes on until nginx sends to it again (nginx
    takes a server that failed max_fails=3 times out for fail_timeout=10s)."""
    upstream.sticky = Fault(delay=0.03, chunk_delay=0.02)      # ~30 ms non-streamed, ~0.2 s streamed
    # the victim writes to the database only every 60 s: at the kill, every record it answered is in its
    # journal alone (and its writer's memory), and only the replay at its restart can save them
    c = make_cluster([upstream.provider()], instance_config={1: {"database": {"flush_interval": "60s"}}})
    victim = c.instances[1]
    total, clients = 400, 24
    results: list[Outcome] = []
    events: dict[str, float] = {}
    # the victim's record ids start with its process's prefix (pipeline.new_request_id)
    victim_prefix = [str(httpx.post(victim.url + "/v1/chat/completions", headers=c.auth(), timeout=10,
                                    json={"model": MODEL, "messages": [{"role": "user", "content": "id?"}]}
                                    ).headers["x-helixagent-request-id"])[:16]]

    async def load() -> None:
        sent = itertools.count()
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=c.auth()) as client:

            async def worker() -> None:
                while (n := next(sent)) < total or "back" not in events:
                    results.append(await one_request(client, c.url, stream=n % 2 == 1))

            async def chaos() -> None:
                while len(results) < 120:
                    await asyncio.sleep(0.002)
                events["killed"] = time.monotonic()
                events["killed_at_done"] = len(results)
                c.kill(1)
                events["victim_rows_at_kill"] = len(await asyncio.to_thread(c.records, "WHERE request_id LIKE %(p)s",
                                                                            {"p": victim_prefix[0] + "%"}))
                await asyncio.to_thread(c.restart, 1, True, {})        # restarted with the default flush
                events["restarted"] = time.monotonic()
                events["restarted_at_done"] = len(results)
                before = sum(1 for e in c.nginx_log() if e.upstreams[-1:] == [victim.addr])
                while time.monotonic() - events["restarted"] < 20:
                    await asyncio.sleep(0.5)
                    if sum(1 for e in c.nginx_log() if e.upstreams[-1:] == [victim.addr]) >= before + 10:
                        break
                events["back"] = time.monotonic()

            await asyncio.gather(chaos(), *(worker() for _ in range(clients)))

    t0 = time.monotonic()
    asyncio.run(load())
    elapsed = time.monotonic() - t0
    ok = [o for o in results if o.ok]
    failed = [o for o in results if not o.ok]

    # every answer the client saw complete has exactly one record, under the id the client was given
    rows = wait_records(c, [o.cid for o in ok])
    by_cid = Counter(r["client_request_id"] for r in rows)
    missing = [o for o in ok if by_cid[o.cid] == 0]
    assert not missing, f"{len(missing)} answered requests have no record: {missing[:5]}"
    assert all(n == 1 for n in by_cid.values()), [k for k, n in by_cid.items() if n > 1]
    rid_of = {r["client_request_id"]: r["request_id"] for r in rows}
    assert all(rid_of[o.cid] == o.rid for o in ok)
    # nothing recorded twice over all requests, failed ones included (no POST replayed by nginx)
    every = c.records("WHERE client_request_id = ANY(%(ids)s)", {"ids": [o.cid for o in results]})
    dup = [k for k, n in Counter(r["client_request_id"] for r in every).items() if n > 1]
    assert not dup, dup
    assert len({r["request_id"] for r in every}) == len(every)

    # a failure is only a request that was on the killed instance (nginx's log says where each went)
    log = {e.request_id: e for e in c.nginx_log()}
    for o in failed:
        e = log.get(o.cid)
        assert e is not None, o
        assert e.upstreams and e.upstreams[-1] == victim.addr and o.t0 <= events["killed"], (o, e)
        assert len(e.upstreams) == 1, (o, e)          # a POST that reached an instance is never replayed
    # which nginx retried: only requests whose first instance refused the connection (never one sent)
    retried = [e for e in log.values() if len(e.upstreams) > 1]
    for e in retried:
        assert e.upstreams[0] == victim.addr, e
    assert c.instances[1].exits == [-9]
    answered_by_victim = [o for o in ok if log[o.cid].upstreams[-1] == victim.addr and o.t1 <= events["killed"]]
    served_after = [o for o in ok if log[o.cid].upstreams[-1] == victim.addr and o.t0 >= events["restarted"]]
    print(f"\nscale-out kill: {len(results)} requests in {elapsed:.1f}s, {len(ok)} complete, {len(failed)} failed "
          f"(on the killed instance); killed after {int(events['killed_at_done'])} done, restarted (ready) "
          f"{events['restarted'] - events['killed']:.2f}s later; {len(rows)} records for the complete ones; "
          f"{len(answered_by_victim)} answered by the victim before the kill, none in the database at the kill, all "
          f"replayed from its spool at restart; "
          f"{len(retried)} retried by nginx (connection refused); {len(served_after)} served by it after "
          f"restart; failed: {Counter(o.status for o in failed)}")
    assert len(results) >= total
    assert len(answered_by_victim) > 0
    assert events["victim_rows_at_kill"] == 0, "the victim's records were meant to be in its journal only"
    assert len(served_after) >= 5, "the restarted instance took no traffic"


def test_limits_are_exact_across_three_instances(make_cluster):
    """rpm 50 on one virtual key, 250 concurrent requests through nginx: exactly 50 admitted."""
    msgs = [{"role": "user", "content": "hello"}]
    per_request = estimate_messages(msgs) + 8
    mock = {"name": "mock", "type": "mock", "mock_tokens": 50, "models": [MODEL], "latency_ms": 20}
    c = make_cluster([mock])
    rpm_key = c.create_key(user_id="rpm-user", application="a", limits={"requests_per_minute": 50})["key"]
    tpm_key = c.create_key(user_id="tpm-user", application="a",
                           limits={"tokens_per_minute": per_request * 12 + 3})["key"]

    async def burst(key: str, n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return list(await asyncio.gather(*(
                client.post(c.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                            json={"model": MODEL, "messages": msgs, "max_tokens": 8}) for _ in range(n))))

    rs = asyncio.run(burst(rpm_key, 250))
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: 50, 429: 200}, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in rs if r.status_code == 429)
    assert all(r.json()["error"]["type"] for r in rs if r.status_code == 429)
    log = c.nginx_log()
    # the burst was spread over the three (nginx's log says which instance answered each); the admitted
    # ones may all come from one: the instance that created the key has it cached, the others look it up
    spread = Counter(e.upstreams[-1] for e in log if e.upstreams and e.status in (200, 429))
    assert len(spread) == 3 and min(spread.values()) >= 40, spread

    rs = asyncio.run(burst(tpm_key, 60))
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: 12, 429: 48}, codes
    assert all(r.json()["usage"]["total_tokens"] == per_request for r in rs if r.status_code == 200)
    bad = next(r for r in rs if r.status_code == 429)
    assert int(bad.headers["retry-after"]) >= 1 and bad.headers["x-ratelimit-remaining-tokens"] == "3"


def test_sigterm_with_streams_in_flight_fails_nothing(make_cluster, upstream):
    """Streams of ~2 s through nginx; SIGTERM instance 2 while they run and new requests keep coming:
    every stream and request completes, the drained instance exits 0, the others take the new ones."""
    upstream.sticky = Fault(chunk_delay=0.25)                   # 9 chunks: ~2.2 s a stream
    c = make_cluster([upstream.provider()], config={"server": {"drain_readiness_delay": "1s",
                                                               "drain_timeout": "15s"}})
    victim = c.instances[2]
    results: list[Outcome] = []
    events: dict[str, float] = {}

    async def load() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30, limits=limits, headers=c.auth()) as client:
            first = [asyncio.ensure_future(one_request(client, c.url, stream=True)) for _ in range(12)]
            await asyncio.sleep(0.6)                              # every stream has started
            events["term"] = time.monotonic()
            c.term(2)

            async def more() -> None:                             # new work during the readiness delay and drain
                while time.monotonic() - events["term"] < 3.5:
                    results.append(await one_request(client, c.url, stream=False))
            await asyncio.gather(*(more() for _ in range(16)))
            results.extend(await asyncio.gather(*first))

    asyncio.run(load())
    rc = c.wait_exit(2, timeout=30)
    failed = [o for o in results if not o.ok]
    log = {e.request_id: e for e in c.nginx_log()}
    # a failure says which race it was: nginx's line for the request (which instances it tried, with
    # what status), nginx's error log (reset, refused, premature close) and the stopped instance's log
    assert not failed, (failed, [log.get(o.cid) for o in failed], events, c.nginx_errors()[-3000:],
                        c.log_tail(2))
    on_victim = [o for o in results if log[o.cid].upstreams[-1] == victim.addr]
    streams_on_victim = [o for o in on_victim if o.stream and o.t0 < events["term"]]
    assert streams_on_victim, "no stream was running on the instance that was stopped"
    assert rc == 0, c.log_tail(2)
    rows = wait_records(c, [o.cid for o in results])
    assert len(rows) == len(results) == len({r["client_request_id"] for r in rows})
    late = [o for o in results if o.t0 > events["term"] + 1.2]
    assert late and all(log[o.cid].upstreams[-1] != victim.addr for o in late)
    print(f"\nscale-out drain: {len(results)} requests, {len(streams_on_victim)} streams in flight on the "
          f"SIGTERMed instance finished; {len(on_victim)} served by it in all; exit {rc}")
