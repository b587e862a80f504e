"""A small in-process rolling window (one slot per second) feeding the dashboard page.

Each slot holds the second it belongs to, so a slot left over from a previous lap of the ring is
recognised and cleared on first use; reading never needs a timer.  Latencies go into a fixed log-spaced
histogram per slot, from which percentiles over any span are computed when the dashboard asks."""
from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

SIZE = 300  # seconds kept
# latency bucket upper bounds in seconds: 1 ms .. ~2 min, ratio 1.25
BOUNDS: tuple[float, ...] = tuple(0.001 * 1.25 ** i for i in range(53))
NB = len(BOUNDS) + 1


class Window:
    __slots__ = ("sec", "req", "err", "hit", "miss", "lat", "prov")

    def __init__(self) -> None:
        self.sec = [-1] * SIZE
        self.req = [0] * SIZE
        self.err = [0] * SIZE
        self.hit = [0] * SIZE
        self.miss = [0] * SIZE
        self.lat: list[list[int]] = [[0] * NB for _ in range(SIZE)]
        # provider -> [requests, errors, prompt tokens, completion tokens, cost]
        self.prov: list[dict[str, list[float]]] = [{} for _ in range(SIZE)]

    def add(self, now: int, latency: float, error: bool, cache: str | None, provider: str,
            prompt: int, completion: int, cost: float) -> None:
        i = now % SIZE
        if self.sec[i] != now:
            self.sec[i] = now
            self.req[i] = self.err[i] = self.hit[i] = self.miss[i] = 0
            lat = self.lat[i]
            for j in range(NB):
                lat[j] = 0
            self.prov[i].clear()
        self.req[i] += 1
        if error:
            self.err[i] += 1
        if cache is not None:
            if cache == "hit":
                self.hit[i] += 1
            elif cache == "miss":
                self.miss[i] += 1
        self.lat[i][bisect_left(BOUNDS, latency)] += 1
        p = self.prov[i].get(provider)
        if p is None:
            p = self.prov[i][provider] = [0, 0, 0, 0, 0.0]
        p[0] += 1
        if error:
            p[1] += 1
        p[2] += prompt
        p[3] += completion
        p[4] += cost

    # -- reading ---------------------------------------------------------------------------------------
    def snapshot(self, now: int | None = None, span: int = SIZE, step: int = 5) -> dict[str, Any]:
        """Series for the last ``span`` seconds (one point per second; percentiles per ``step`` s) and
        totals over the last minute."""
        now = int(time.time()) if now is None else now
        span = max(step, min(span, SIZE))
        start = now - span + 1
        t: list[int] = []
        rps: list[int] = []
        eps: list[int] = []
        hits: list[int] = []
        misses: list[int] = []
        p50: list[float | None] = []
        p95: list[float | None] = []
        p99: list[float | None] = []
        pt: list[int] = []
        agg = [0] * NB
        for k, s in enumerate(range(start, now + 1)):
            i = s % SIZE
            live = self.sec[i] == s
            t.append(s)
            rps.append(self.req[i] if live else 0)
            eps.append(self.err[i] if live else 0)
            hits.append(self.hit[i] if live else 0)
            misses.append(self.miss[i] if live else 0)
            if live:
                lat = self.lat[i]
                for j in range(NB):
                    if lat[j]:
                        agg[j] += lat[j]
            if (k + 1) % step == 0:
                pt.append(s)
                q = percentiles(agg, (0.5, 0.95, 0.99))
                p50.append(q[0])
                p95.append(q[1])
                p99.append(q[2])
                agg = [0] * NB
        # last minute totals
        minute = [0] * NB
        req = err = hit = miss = 0
        providers: dict[str, dict[str, float]] = {}
        for s in range(now - 59, now + 1):
            i = s % SIZE
            if self.sec[i] != s:
                continue
            req += self.req[i]
            err += self.err[i]
            hit += self.hit[i]
            miss += self.miss[i]
            lat = self.lat[i]
            for j in range(NB):
                if lat[j]:
                    minute[j] += lat[j]
        for s in range(start, now + 1):  # tokens / cost by provider over the whole span
            i = s % SIZE
            if self.sec[i] != s:
                continue
            for name, v in self.prov[i].items():
                d = providers.get(name)
                if d is None:
                    d = providers[name] = {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                           "completion_tokens": 0, "cost": 0.0}
                d["requests"] += v[0]
                d["errors"] += v[1]
                d["prompt_tokens"] += v[2]
                d["completion_tokens"] += v[3]
                d["cost"] += v[4]
        q = percentiles(minute, (0.5, 0.95, 0.99))
        return {
            "now": now, "span": span, "step": step,
            "series": {"t": t, "requests": rps, "errors": eps, "cache_hits": hits, "cache_misses": misses,
                       "latency_t": pt, "p50": p50, "p95": p95, "p99": p99},
            "last_minute": {"requests": req, "errors": err, "rps": round(req / 60.0, 3),
                            "error_rate": round(err / req, 4) if req else 0.0,
                            "cache_hits": hit, "cache_misses": miss,
                            "cache_hit_ratio": round(hit / (hit + miss), 4) if hit + miss else None,
                            "p50": q[0], "p95": q[1], "p99": q[2]},
            "providers": providers,
        }


def percentiles(hist: list[int], qs: tuple[float, ...]) -> list[float | None]:
    """Upper-bound estimates (seconds) of the quantiles of a bucketed histogram."""
    total = sum(hist)
    if not total:
        return [None for _ in qs]
    out: list[float | None] = []
    for q in qs:
        rank = q * total
        acc = 0
        val = BOUNDS[-1]
        for j, n in enumerate(hist):
            acc += n
            if acc >= rank and n:
                val = BOUNDS[j] if j < len(BOUNDS) else BOUNDS[-1]
                break
        out.append(round(val, 6))
    return out
