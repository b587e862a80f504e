"""Provider concurrency caps as priority queues (routing/queue.py): over real HTTP with the fake OpenAI upstream
(calls held by a gate, so the order in which queued requests reach the upstream is the queue's order), and the
scheduler itself in process (model caps, weights, cancellation)."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from fakes.openai_upstream import Fault
from support.keys import MASTER, admin_create
from support.servers import wait_until

from helixagent.errors import GatewayError
from helixagent.pipeline import Identity, RequestContext
from helixagent.routing.queue import ProviderQueue

client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))


def chat(gw: Any, text: str, key: str | None = None, priority: str | None = None, timeout: float = 30,
         path: str = "/v1/chat/completions", **body: Any) -> httpx.Response:
    h = {}
    if key:
        h["authorization"] = f"Bearer {key}"
    if priority:
        h["x-helixagent-priority"] = priority
    return client.post(gw.url + path, headers=h, timeout=timeout,
                       json={"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **body})


def arrivals(fake: Any) -> list[str]:
    return [c["body"]["messages"][-1]["content"] for c in fake.calls if c["path"] == "/v1/chat/completions"]


def queue_of(gw: Any, name: str = "openai") -> ProviderQueue:
    q = gw.app.router.queues.get(name)
    assert q is not None
    return q


def blocked(gw: Any, fake: Any, ex: ThreadPoolExecutor, n: int, key: str | None = None) -> tuple[threading.Event, list[Any]]:
    """``n`` requests that hold the provider's ``n`` slots until the returned gate is set."""
    gate = threading.Event()
    fake.push(*[Fault(gate=gate) for _ in range(n)])
    base = len(fake.calls)
    futs = [ex.submit(chat, gw, f"blocker{i}", key) for i in range(n)]
    q = queue_of(gw)
    assert wait_until(lambda: q.active == n and len(fake.calls) == base + n), (q.snapshot(), len(fake.calls))
    return gate, futs


# -- priorities ---------------------------------------------------------------------------------------------------
def test_high_priority_overtakes_queued_low(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=2)]})
    q = queue_of(gw)
    with ThreadPoolExecutor(16) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 2)
        lows = [ex.submit(chat, gw, f"low{i}", priority="low") for i in range(4)]
        assert wait_until(lambda: q.depth[2] == 4), q.snapshot()
        highs = [ex.submit(chat, gw, f"high{i}", priority="high") for i in range(2)]
        normal = ex.submit(chat, gw, "normal0")
        assert wait_until(lambda: q.waiting == 7), q.snapshot()
        assert q.snapshot()["waiting"] == {"high": 2, "normal": 1, "low": 4}
        gate.set()
        res = [f.result() for f in blockers + lows + highs + [normal]]
    assert [r.status_code for r in res] == [200] * 9, [r.text for r in res]
    order = arrivals(fake_openai)
    assert sorted(order[:2]) == ["blocker0", "blocker1"]
    assert sorted(order[2:4]) == ["high0", "high1"], order
    assert order[4] == "normal0", order
    assert sorted(order[5:]) == ["low0", "low1", "low2", "low3"], order
    assert res[-2].headers["x-helixagent-priority"] == "high"
    text = httpx.get(gw.url + "/metrics").text
    assert 'helixagent_queue_wait_seconds_count{priority="low",provider="openai"} 4.0' in text, text
    assert 'helixagent_queue_depth{priority="low",provider="openai"} 0.0' in text
    assert 'helixagent_queue_capacity{provider="openai"} 2.0' in text


def test_bad_priority_header_is_400_naming_it(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=2)]})
    r = chat(gw, "x", priority="urgent")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "x-helixagent-priority" and "x-helixagent-priority" in err["message"]
    r = client.post(gw.url + "/v1/messages", headers={"x-helixagent-priority": "HIGHEST"},
                    json={"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert "x-helixagent-priority" in r.json()["error"]["message"]
    assert not fake_openai.calls
    assert chat(gw, "x", priority="HIGH").status_code == 200  # case does not matter


def test_key_default_and_maximum_priority(make_gateway, fake_openai):
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_concurrency=1)]})
    capped = admin_create(gw, limits={"priority": "low", "max_priority": "normal"})["key"]
    r = chat(gw, "x", capped, priority="high")
    assert r.status_code == 200 and r.headers["x-helixagent-priority"] == "normal"  # lowered to the key's cap
    assert "x-helixagent-priority" not in chat(gw, "x", capped).headers  # the key's default: no header sent
    bad = client.post(gw.url + "/admin/keys", headers={"authorization": f"Bearer {MASTER}"},
                      json={"role": "user", "limits": {"priority": "urgent"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limits.priority"
    q = queue_of(gw)
    with ThreadPoolExecutor(8) as ex:  # the key's default (low) really is low: a normal request overtakes it
        gate, blockers = blocked(gw, fake_openai, ex, 1, MASTER)
        low = ex.submit(chat, gw, "keydefault", capped)
        assert wait_until(lambda: q.depth[2] == 1), q.snapshot()
        normal = ex.submit(chat, gw, "masternormal", MASTER)
        assert wait_until(lambda: q.depth[1] == 1), q.snapshot()
        gate.set()
        assert low.result().status_code == normal.result().status_code == blockers[0].result().status_code == 200
    order = arrivals(fake_openai)
    assert order.index("masternormal") < order.index("keydefault"), order


# -- fair share ---------------------------------------------------------------------------------------------------
def _flood(gw: Any, fake: Any, keys: dict[str, str], per_key: int, extra: dict[str, str] | None = None) -> list[str]:
    """Queue ``per_key`` requests of every key behind a held cap of 2, then ``extra`` single requests; release;
    the keys (by name) in the order their requests reached the upstream."""
    q = queue_of(gw)
    owner: dict[str, str] = {}
    with ThreadPoolExecutor(2 * per_key * len(keys) + 8) as ex:
        gate, blockers = blocked(gw, fake, ex, 2, MASTER)
        futs = []
        for name, key in keys.items():
            for i in range(per_key):
                text = f"{name}-{i}"
                owner[text] = name
                futs.append(ex.submit(chat, gw, text, key))
        total = per_key * len(keys)
        assert wait_until(lambda n=total: q.waiting == n, timeout=20), q.snapshot()
        for name, key in (extra or {}).items():
            owner[name + "-0"] = name
            futs.append(ex.submit(chat, gw, name + "-0", key))
            total += 1
            assert wait_until(lambda n=total: q.waiting == n), q.snapshot()
        gate.set()
        res = [f.result() for f in blockers + futs]
    assert all(r.status_code == 200 for r in res), [r.text for r in res if r.status_code != 200][:3]
    return [owner[t] for t in arrivals(fake)[2:]]


def test_two_keys_of_equal_weight_share_equally(make_gateway, fake_openai):
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_concurrency=2)]})
    a, b = (admin_create(gw, user=u)["key"] for u in ("alice", "bob"))
    order = _flood(gw, fake_openai, {"a": a, "b": b}, 30)
    window = order[:40]  # while both keys still have a backlog
    assert abs(window.count("a") - window.count("b")) <= 4, order  # equal within 10%


def test_weights_share_in_proportion(make_gateway, fake_openai):
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_concurrency=2)]})
    heavy = admin_create(gw, user="heavy", limits={"queue_weight": 2})["key"]
    light = admin_create(gw, user="light")["key"]
    order = _flood(gw, fake_openai, {"h": heavy, "l": light}, 24)
    window = order[:30]
    assert 18 <= window.count("h") <= 22, order  # 2:1 (20 of 30)


def test_newcomer_is_not_starved_behind_a_flood(make_gateway, fake_openai):
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_concurrency=2)]})
    a, b, c = (admin_create(gw, user=u)["key"] for u in ("alice", "bob", "carol"))
    order = _flood(gw, fake_openai, {"a": a, "b": b}, 25, extra={"c": c})
    assert order.index("c") < 4, order  # behind at most the floods' first requests, not their 50


def test_fair_share_by_user(make_gateway, fake_openai):
    # routing.queue.fair_share: user -- two keys of one user share one flow against another user's key
    gw = make_gateway({"auth": {"master_key": MASTER}, "routing": {"queue": {"fair_share": "user"}},
                       "providers": [fake_openai.provider(max_concurrency=2)]})
    a1, a2 = (admin_create(gw, user="alice")["key"] for _ in range(2))
    b = admin_create(gw, user="bob")["key"]
    order = _flood(gw, fake_openai, {"a1": a1, "a2": a2, "b": b}, 12)
    window = order[:24]
    alice = window.count("a1") + window.count("a2")
    assert 10 <= alice <= 14, order  # alice's two keys together get bob's share, not twice it


# -- timeouts, fallback, health -------------------------------------------------------------------------------------
def test_queue_timeout_is_503_with_retry_after_and_health_untouched(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=1, queue_timeout_ms=300, max_retries=0)]})
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        r = chat(gw, "late")
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "queue_timeout" and err["type"] == "service_unavailable"
        m = client.post(gw.url + "/v1/messages", json={"model": "gpt-4o", "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "late2"}]})
        assert m.status_code == 503 and m.json()["error"]["type"] == "overloaded_error" and "retry-after" in m.headers
        gate.set()
        assert blockers[0].result().status_code == 200
    assert arrivals(fake_openai) == ["blocker0"]
    h = gw.app.router.health.describe("openai")
    assert h["breaker"] == "closed" and h["consecutive_failures"] == 0 and h["error_rate"] == 0.0, h
    q = httpx.get(gw.url + "/health").json()["providers"]["openai"]["queue"]
    assert q["capacity"] == 1 and q["in_use"] == 0 and q["timeouts"] == 2, q
    assert chat(gw, "after").status_code == 200
    text = httpx.get(gw.url + "/metrics").text
    assert 'helixagent_queue_rejections_total{priority="normal",provider="openai",reason="timeout"} 2.0' in text


def test_queue_timeout_falls_back_to_the_next_candidate(make_gateway, fake_openai):
    gw = make_gateway({"providers": [
        fake_openai.provider(max_concurrency=1, queue_timeout_ms=200, fallback_to=["backup"]),
        fake_openai.provider(name="backup", priority=2)]})
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        r = chat(gw, "spill")
        gate.set()
        assert blockers[0].result().headers["x-helixagent-provider"] == "openai"
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "backup", r.text
    assert gw.app.router.health.describe("openai")["consecutive_failures"] == 0


def test_hedged_mode_queues_too(make_gateway, fake_openai):
    gw = make_gateway({"routing": {"hedging": {"enabled": True}}, "providers": [
        fake_openai.provider(max_concurrency=1, queue_timeout_ms=200, fallback_to=["backup"]),
        fake_openai.provider(name="backup", priority=2)]})
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        r = chat(gw, "spill")
        gate.set()
        assert blockers[0].result().status_code == 200
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "backup", r.text
    assert queue_of(gw).active == 0


def test_http_max_conns_per_host_is_a_queue(make_gateway, fake_openai):
    gw = make_gateway({"http": {"max_conns_per_host": 2}, "providers": [fake_openai.provider()]})
    fake_openai.sticky = Fault(delay=0.05)
    with ThreadPoolExecutor(12) as ex:
        res = list(ex.map(lambda i: chat(gw, f"r{i}"), range(12)))
    assert all(r.status_code == 200 for r in res)
    assert fake_openai.max_inflight == 2
    assert queue_of(gw).snapshot()["capacity"] == 2


def test_a_stream_holds_its_slot_until_it_ends(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=2)]})
    fake_openai.sticky = Fault(chunk_delay=0.03)

    def stream(i: int) -> str:
        with client.stream("POST", gw.url + "/v1/chat/completions",
                           json={"model": "gpt-4o", "stream": True,
                                 "messages": [{"role": "user", "content": f"s{i} a b c"}]}) as r:
            assert r.status_code == 200
            return r.read().decode()

    with ThreadPoolExecutor(6) as ex:
        bodies = list(ex.map(stream, range(6)))
    assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
    assert fake_openai.max_inflight == 2
    assert queue_of(gw).active == 0


def test_a_client_that_leaves_the_queue_never_reaches_the_upstream(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=1)]})
    q = queue_of(gw)
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        with pytest.raises(httpx.ReadTimeout):
            chat(gw, "leaver", timeout=0.5)
        assert wait_until(lambda: q.waiting == 0, timeout=5), q.snapshot()  # gone while the slot is still held
        assert q.active == 1
        stayer = ex.submit(chat, gw, "stayer")
        assert wait_until(lambda: q.waiting == 1)
        gate.set()
        assert blockers[0].result().status_code == 200 and stayer.result().status_code == 200
    assert arrivals(fake_openai) == ["blocker0", "stayer"]


def test_max_waiting_rejects_at_once(make_gateway, fake_openai):
    gw = make_gateway({"routing": {"queue": {"max_waiting": 1}},
                       "providers": [fake_openai.provider(max_concurrency=1, max_retries=0)]})
    q = queue_of(gw)
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        waiting = ex.submit(chat, gw, "waits")
        assert wait_until(lambda: q.waiting == 1)
        r = chat(gw, "full")
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers
        gate.set()
        assert waiting.result().status_code == 200


def test_config_rejects_bad_caps():
    from helixagent.config import ConfigError, load_config_dict
    for bad in ({"max_concurrency": 0}, {"models_concurrency": {"gpt-4o": 0}}, {"queue_timeout_ms": -1}):
        with pytest.raises(ConfigError) as e:
            load_config_dict({"providers": [{"name": "openai", "api_key": "k", **bad}]})
        assert "providers[0]" in str(e.value)
    with pytest.raises(ConfigError, match="'gpt-4': not|models_concurrency names 'gpt-4'"):
        load_config_dict({"providers": [{"name": "openai", "api_key": "k", "models": ["gpt-4o"],
                                         "models_concurrency": {"gpt-4": 2}}]})
    with pytest.raises(ConfigError, match="fair_share"):
        load_config_dict({"routing": {"queue": {"fair_share": "ip"}}})


# -- the scheduler in process ---------------------------------------------------------------------------------------
def _ctx(flow: str, priority: str = "normal", weight: float | None = None) -> RequestContext:
    ctx = RequestContext("chat")
    ctx.identity = Identity(key_id=flow, limits={"queue_weight": weight} if weight else {})
    ctx.priority = priority  # type: ignore[assignment]
    return ctx


def test_model_caps_inside_a_provider():
    async def main() -> None:
        q = ProviderQueue("p", None, {"big": 1}, 5.0, 100, "api_key")
        first = await q.acquire(_ctx("k"), "big", 5.0)
        second = asyncio.ensure_future(q.acquire(_ctx("k"), "big", 5.0))
        await asyncio.sleep(0.01)
        assert not second.done() and q.waiting == 1
        other = await asyncio.wait_for(q.acquire(_ctx("k"), "small", 5.0), 1)  # another model is not held up
        first.release()
        lease = await asyncio.wait_for(second, 1)
        lease.release()
        other.release()
        assert q.active == 0 and q.model_active["big"] == 0
    asyncio.run(main())


def test_cancelled_and_granted_in_the_same_instant_hands_the_slot_on():
    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 5.0, 100, "api_key")
        held = await q.acquire(_ctx("a"), "m", 5.0)
        w1 = asyncio.ensure_future(q.acquire(_ctx("a"), "m", 5.0))
        w2 = asyncio.ensure_future(q.acquire(_ctx("b"), "m", 5.0))
        await asyncio.sleep(0)
        held.release()  # grants w1 ...
        w1.cancel()  # ... which is cancelled before it runs: w2 gets the slot
        lease = await asyncio.wait_for(w2, 1)
        assert w1.cancelled() and q.active == 1 and q.waiting == 0
        lease.release()
        assert q.active == 0
    asyncio.run(main())


def test_many_cancelled_waiters_leave_no_trace():
    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 5.0, 10000, "api_key")
        held = await q.acquire(_ctx("a"), "m", 5.0)
        ws = [asyncio.ensure_future(q.acquire(_ctx(f"k{i % 7}", "low" if i % 2 else "high"), "m", 5.0))
              for i in range(500)]
        await asyncio.sleep(0)
        assert q.waiting == 500
        for w in ws[:499]:
            w.cancel()
        await asyncio.sleep(0)
        assert q.waiting == 1 and q.depth == [0, 0, 1] and sum(len(h) for h in q.heaps.values()) < 100
        held.release()
        (await asyncio.wait_for(ws[499], 1)).release()
        assert q.active == 0
    asyncio.run(main())


def test_timeout_inside_the_budget_and_the_budget_itself():
    from helixagent.routing.queue import BudgetSpent

    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 0.05, 100, "api_key")
        held = await q.acquire(_ctx("a"), "m", 5.0)
        with pytest.raises(GatewayError) as e:
            await q.acquire(_ctx("b"), "m", 5.0)
        assert e.value.status == 503 and e.value.code == "queue_timeout" and e.value.retryable
        assert e.value.retry_after is not None and e.value.retry_after >= 1
        with pytest.raises(BudgetSpent):  # the request's budget is shorter than the queue timeout
            await q.acquire(_ctx("b"), "m", 0.01)
        held.release()
        assert q.waiting == 0 and q.active == 0 and q.timeouts == 2
    asyncio.run(main())


def test_start_time_fair_order():
    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 5.0, 100, "api_key")
        held = await q.acquire(_ctx("x"), "m", 5.0)
        order: list[str] = []

        async def one(flow: str, w: float | None) -> None:
            lease = await q.acquire(_ctx(flow, weight=w), "m", 5.0)
            order.append(flow)
            await asyncio.sleep(0)
            lease.release()

        tasks = [asyncio.ensure_future(one("h", 3)) for _ in range(9)]
        tasks += [asyncio.ensure_future(one("l", None)) for _ in range(3)]
        await asyncio.sleep(0)
        held.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 2)
        assert order[:4].count("h") == 3 and order[:8].count("h") == 6, order  # 3:1
    asyncio.run(main())


def test_cli_creates_a_key_with_queue_settings(make_gateway, tmp_path):
    import json
    import os
    import subprocess
    import sys
    db = f"sqlite:///{tmp_path}/cli.db"
    cfgfile = tmp_path / "cfg.yaml"
    cfgfile.write_text(f"database: {{url: '{db}'}}\n")
    make_gateway({"auth": {"master_key": MASTER}, "database": {"url": db}})  # migrates the database
    env = dict(os.environ)
    env.pop("HELIXAGENT_API_KEY", None)
    p = subprocess.run([sys.executable, "-m", "helixagent", "keys", "create", "--user", "etl", "--priority", "low",
                        "--max-priority", "normal", "--queue-weight", "0.5", "--json", "--config", str(cfgfile)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["limits"] == {"priority": "low", "max_priority": "normal", "queue_weight": 0.5}


def test_an_unread_stream_gives_its_slot_back_when_dropped():
    from helixagent.routing.queue import LeasedStream

    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 5.0, 100, "api_key")
        lease = await q.acquire(_ctx("a"), "m", 5.0)

        async def chunks():
            yield {}

        s = LeasedStream(chunks(), lease)
        waiter = asyncio.ensure_future(q.acquire(_ctx("b"), "m", 5.0))
        await asyncio.sleep(0)
        del s  # never iterated nor closed (a response that could not start): garbage, the slot comes back
        (await asyncio.wait_for(waiter, 1)).release()
        assert q.active == 0
    asyncio.run(main())


def test_a_waiter_cancelled_just_before_its_grant_or_its_timeout():
    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 0.02, 100, "api_key")
        held = await q.acquire(_ctx("a"), "m", 5.0)
        w1 = asyncio.ensure_future(q.acquire(_ctx("a"), "m", 5.0))
        w2 = asyncio.ensure_future(q.acquire(_ctx("b"), "m", 5.0))
        await asyncio.sleep(0)
        w1.cancel()  # its future is cancelled now, its task runs later
        await asyncio.sleep(0)  # w1's task is scheduled: the grant below must skip it, not fail
        w3 = asyncio.ensure_future(q.acquire(_ctx("c"), "m", 5.0))
        await asyncio.sleep(0)
        w3.cancel()
        await asyncio.sleep(0.05)  # w2's and w3's timers fire; w3's future is already cancelled
        held.release()
        for w in (w1, w3):
            with pytest.raises(asyncio.CancelledError):
                await w
        with pytest.raises(GatewayError):
            await w2
        assert q.waiting == 0 and q.active == 0 and q.depth == [0, 0, 0]
    asyncio.run(main())


def test_a_grant_skips_a_waiter_whose_task_was_cancelled_in_the_same_tick():
    async def main() -> None:
        q = ProviderQueue("p", 1, {}, 5.0, 100, "api_key")
        held = await q.acquire(_ctx("a"), "m", 5.0)
        w1 = asyncio.ensure_future(q.acquire(_ctx("a"), "m", 5.0))
        w2 = asyncio.ensure_future(q.acquire(_ctx("b"), "m", 5.0))
        await asyncio.sleep(0)
        w1.cancel()  # w1's future is cancelled at once; its task has not run
        held.release()  # the grant passes w1 by
        lease = await asyncio.wait_for(w2, 1)
        with pytest.raises(asyncio.CancelledError):
            await w1
        assert q.active == 1 and q.waiting == 0
        lease.release()
        assert q.active == 0
    asyncio.run(main())


def test_no_slot_leaks_when_clients_leave_at_random(make_gateway, fake_openai):
    # 60 requests through a cap of 3 at a slow upstream; a third of the clients give up at various points
    # (queued, mid-call, mid-stream); afterwards no slot is held and nothing waits
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=3)]})
    fake_openai.sticky = Fault(delay=0.05, chunk_delay=0.01)
    q = queue_of(gw)

    def one(i: int) -> int:
        timeout = (0.05, 0.15, 0.4)[i % 3] if i % 3 == 0 or i % 5 == 0 else 30
        try:
            if i % 2:
                with client.stream("POST", gw.url + "/v1/chat/completions", timeout=timeout,
                                   json={"model": "gpt-4o", "stream": True,
                                         "messages": [{"role": "user", "content": f"s{i} a b c d"}]}) as r:
                    r.read()
                    return r.status_code
            return chat(gw, f"c{i}", timeout=timeout).status_code
        except httpx.TimeoutException:
            return 0

    with ThreadPoolExecutor(60) as ex:
        codes = list(ex.map(one, range(60)))
    assert codes.count(200) >= 30 and set(codes) <= {0, 200}, codes
    assert wait_until(lambda: q.active == 0 and q.waiting == 0, timeout=15), q.snapshot()
    assert chat(gw, "after").status_code == 200


def test_an_embeddings_client_that_leaves_the_queue_never_reaches_the_upstream(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=1, models=["text-embedding-3-small"])]})
    q = queue_of(gw)
    gate = threading.Event()
    fake_openai.push(Fault(gate=gate))
    with ThreadPoolExecutor(4) as ex:
        blocker = ex.submit(client.post, gw.url + "/v1/embeddings",
                            json={"model": "text-embedding-3-small", "input": "blocker"})
        assert wait_until(lambda: q.active == 1 and len(fake_openai.calls) == 1)
        with pytest.raises(httpx.ReadTimeout):
            client.post(gw.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "leaver"},
                        timeout=0.5)
        assert wait_until(lambda: q.waiting == 0, timeout=5), q.snapshot()
        gate.set()
        assert blocker.result().status_code == 200
    assert [c["body"]["input"] for c in fake_openai.calls] == [["blocker"]]


def test_a_config_reload_changes_the_caps_in_place(make_gateway, fake_openai):
    from helixagent.config import load_config_dict
    cfg = {"providers": [fake_openai.provider(max_concurrency=1, models_concurrency={"gpt-4o": 1})]}
    gw = make_gateway(cfg)
    q = queue_of(gw)
    with ThreadPoolExecutor(8) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1)
        waiters = [ex.submit(chat, gw, f"w{i}") for i in range(2)]
        assert wait_until(lambda: q.waiting == 2), q.snapshot()
        new = load_config_dict({**cfg, "database": gw.cfg.database.model_dump(),
                                "providers": [fake_openai.provider(max_concurrency=3)]})

        async def reload() -> None:
            gw.app.router.reconfigure(new, gw.app.providers)

        gw.run(reload())
        assert queue_of(gw) is q and q.cap == 3 and q.model_caps == {}
        assert wait_until(lambda: q.waiting == 0 and len(fake_openai.calls) == 3), q.snapshot()  # granted at once
        gate.set()
        assert all(f.result().status_code == 200 for f in blockers + waiters)
    assert q.active == 0
    gone = load_config_dict({**cfg, "database": gw.cfg.database.model_dump(), "providers": [fake_openai.provider()]})

    async def uncap() -> None:
        gw.app.router.reconfigure(gone, gw.app.providers)

    gw.run(uncap())
    assert gw.app.router.queues.get("openai") is None and chat(gw, "free").status_code == 200


def test_a_free_slot_is_a_wait_of_zero_in_the_metrics_across_a_reload(make_gateway, fake_openai):
    """A slot that was free is counted by the queue, not reported one by one: the metrics add those waits of
    0 s when they flush, as if observed one by one; a queue a reload dropped still has its count read."""
    from helixagent.config import load_config_dict
    cfg = {"providers": [fake_openai.provider(max_concurrency=4)]}
    gw = make_gateway(cfg)
    q = queue_of(gw)
    for i in range(5):
        assert chat(gw, f"n{i}").status_code == 200
    assert chat(gw, "h", priority="high").status_code == 200
    text = httpx.get(gw.url + "/metrics").text
    assert 'helixagent_queue_wait_seconds_count{priority="normal",provider="openai"} 5.0' in text, text
    assert 'helixagent_queue_wait_seconds_bucket{le="0.001",priority="normal",provider="openai"} 5.0' in text
    assert 'helixagent_queue_wait_seconds_sum{priority="normal",provider="openai"} 0.0' in text
    assert 'helixagent_queue_wait_seconds_count{priority="high",provider="openai"} 1.0' in text
    assert 'priority="low",provider="openai"} 0.0' not in text.split("helixagent_queue_wait_seconds_count")[-1]
    gone = load_config_dict({**cfg, "database": gw.cfg.database.model_dump(), "providers": [fake_openai.provider()]})

    async def uncap_then_take_the_old_slot() -> None:
        gw.app.router.reconfigure(gone, gw.app.providers)
        ctx = RequestContext("chat")
        ctx.identity = Identity(key_id="k")
        (await q.acquire(ctx, "gpt-4o", 5.0)).release()  # a request that had the queue before the reload

    gw.run(uncap_then_take_the_old_slot())
    assert gw.app.router.queues.get("openai") is None
    text = httpx.get(gw.url + "/metrics").text
    assert 'helixagent_queue_wait_seconds_count{priority="normal",provider="openai"} 6.0' in text, text


def test_batch_lines_queue_at_the_lowest_priority(make_gateway, fake_openai):
    import openai
    import orjson
    gw = make_gateway({"auth": {"master_key": MASTER}, "batches": {"mode": "local", "poll_interval": "50ms"},
                       "database": {"auto_migrate": True, "flush_interval": "20ms"},
                       "providers": [fake_openai.provider(max_concurrency=1, max_retries=0)]})
    q = queue_of(gw)
    key = admin_create(gw, user_id="etl")["key"]
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)
    lines = b"".join(orjson.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"line{i}"}]}})
                     + b"\n" for i in range(3))
    with ThreadPoolExecutor(4) as ex:
        gate, blockers = blocked(gw, fake_openai, ex, 1, MASTER)
        f = c.files.create(file=("lines.jsonl", lines), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_until(lambda: q.depth[2] >= 1, timeout=20), q.snapshot()  # the batch's lines wait at low
        interactive = ex.submit(chat, gw, "interactive", key)
        assert wait_until(lambda: q.depth[1] == 1), q.snapshot()
        gate.set()
        assert interactive.result().status_code == 200 and blockers[0].result().status_code == 200
    assert wait_until(lambda: c.batches.retrieve(b.id).status == "completed", timeout=30)
    order = arrivals(fake_openai)
    assert order[1] == "interactive" and sorted(order[2:]) == ["line0", "line1", "line2"], order


def test_a_thousand_concurrent_requests_through_a_cap_of_four(make_gateway, fake_openai):
    """Far more concurrency than the cap (1,000 at once, half streamed, three priorities): every request is
    answered, the upstream never sees more than 4 at a time, and the queue ends empty with no slot held."""
    import aiohttp

    gw = make_gateway({"providers": [fake_openai.provider(max_concurrency=4, queue_timeout_ms=120000)]})
    fake_openai.sticky = Fault(delay=0.01)

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[int, bool]:
        stream = i % 2 == 0
        async with s.post(gw.url + "/v1/chat/completions",
                          headers={"x-helixagent-priority": ("high", "normal", "low")[i % 3]},
                          json={"model": "gpt-4o", "stream": stream,
                                "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
            text = await r.text()
            return r.status, (not stream) or text.rstrip().endswith("data: [DONE]")

    async def run() -> list[tuple[int, bool]]:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=180)) as s:
            return list(await asyncio.gather(*(one(s, i) for i in range(1000))))

    res = asyncio.run(run())
    bad = [r for r in res if r != (200, True)]
    assert not bad, bad[:5]
    assert len(arrivals(fake_openai)) == 1000
    assert fake_openai.max_inflight == 4, fake_openai.max_inflight  # the cap was reached, never passed
    q = queue_of(gw)
    assert q.active == 0 and q.waiting == 0, q.snapshot()
