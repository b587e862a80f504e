"""Native mode: a batch whose every line routes to one OpenAI provider (an OpenAI batch) or one Anthropic
provider (a Message Batch) is submitted to that vendor's own batch API -- at its batch discount -- and
polled; when the vendor's batch has ended its results are mapped back onto the lines (one result each),
each line gets its completion record (cost at ``batches.native_discount`` of the list price), and the batch
closes as a local one does (output and error files, request_counts).

``batches.mode``: ``local`` never goes native; ``auto`` goes native when every line routes to one such
provider (the router's first choice for the line's model), else runs locally, and also falls back to local
when the vendor refuses the submission (a 4xx); ``native`` requires it (a batch that cannot go native is a
400 at creation naming the first line that cannot).

One instance at a time takes a native batch's next step (a lease on the batch row); a step interrupted
by a crash is taken again by any instance.  Submission is marked ``submitting`` first; an OpenAI batch is
created with ``metadata.helixagent_batch`` = our id, so a retried submission finds the vendor batch of the
interrupted one instead of creating a second (the Anthropic API has no metadata: a crash between its
create call and our write can leave one orphan vendor batch, logged when the step is retried).
Transient vendor failures (5xx, timeouts, connection errors) are retried at the next poll."""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

import orjson

from ..api.openai_format import HELIX_FIELDS, split_model
from ..canonical import Usage
from ..errors import GatewayError, bad_request
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext
from ..routing.costs import cost_of, price
from .execute import TARGETS, request_id_of
from .store import BatchRow, Claimed, utcnow

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger("helixagent.batches")

OPENAI_DONE = ("completed", "expired", "cancelled", "failed")


def _route(gw: GatewayLike, body: dict[str, Any]) -> tuple[Any, str] | None:
    """The router's first choice for a line: (provider, upstream model), or None."""
    try:
        model, pinned = split_model(body.get("model"), body.get("provider"), gw.providers)
        cands = gw.router.candidates(model, pinned)
    except GatewayError:
        return None
    return (cands[0].provider, cands[0].model) if cands else None


def choose(gw: GatewayLike, api: str, bodies: list[dict[str, Any]]) -> str | None:
    """The provider a new batch runs at natively, or None (local)."""
    mode = gw.cfg.batches.mode
    if mode == "local":
        return None
    want = "anthropic" if api == "anthropic" else "openai"
    chosen: str | None = None
    for n, body in enumerate(bodies, start=1):
        r = _route(gw, body)
        p = r[0] if r is not None else None
        if p is None or p.cfg.type != want or (chosen is not None and p.name != chosen):
            if mode == "native":
                if p is None:
                    why = "routes to no provider"
                elif p.cfg.type != want:
                    why = f"routes to provider {p.name!r} ({p.cfg.type}), which has no {want} batch API"
                else:
                    why = f"routes to provider {p.name!r}, another than the earlier lines' {chosen!r}"
                where = f"requests.{n - 1}.params.model" if api == "anthropic" else "input_file_id"
                raise bad_request(f"batches.mode is native, but {'request' if api == 'anthropic' else 'line'} "
                                  f"{n - 1 if api == 'anthropic' else n} ({body.get('model')!r}) {why}", param=where,
                                  code="native_batch_unavailable")
            return None
        chosen = p.name
    return chosen


def _upstream_body(gw: GatewayLike, body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in HELIX_FIELDS}
    r = _route(gw, body)
    if r is not None:
        out["model"] = r[1]
    return out


def _headers(p: Any, json: bool = True) -> dict[str, str]:
    h = {k: v for k, v in p.headers.items() if k.lower() != "content-type"}
    if json:
        h["content-type"] = "application/json"
    return h


async def _call(p: Any, method: str, url: str, body: Any = None, raw: bytes | None = None,
                ctype: str | None = None) -> tuple[int, bytes]:
    if method == "GET":
        code, got = await p.http.get(url, _headers(p, json=False))
        return int(code), bytes(got)
    h = _headers(p, json=ctype is None)
    if ctype is not None:
        h["content-type"] = ctype
    status, _, data = await p.http.post(url, raw if raw is not None else orjson.dumps(body or {}), h)
    return int(status), bytes(data)


def _json(status: int, data: bytes, what: str, p: Any) -> Any:
    """The vendor's JSON answer; an error status is a GatewayError quoting the vendor's answer -- scrubbed
    of secrets (``Provider.scrub``), as every upstream message is: it is logged, and a failed batch's
    ``errors`` reach the client."""
    if status >= 300:
        raise GatewayError(502 if status >= 500 else status, f"{what}: the vendor answered {status}: "
                           f"{p.scrub(data[:300].decode('utf-8', 'replace'))}", provider=p.name,
                           retryable=status >= 500, kind="native_batch")
    return orjson.loads(data)


# -- a step ---------------------------------------------------------------------------------------------
async def step(runner: "Runner", b: BatchRow) -> None:
    """The next step of a native batch (this instance holds its lease)."""
    gw, st, owner = runner.gw, runner.store, runner.owner
    p = gw.providers.get(b.provider or "")
    if p is None:
        log.error("native batch %s: its provider %r is no longer configured; the batch runs locally", b.id, b.provider)
        await st.update_native(b.id, owner, mode="local", lease_until=None)
        return
    try:
        if b.upstream_id is None:
            if b.status == "cancelling" or (b.times["expires_at"] or utcnow()) <= utcnow():
                to = "cancelled" if b.status == "cancelling" else "expired"
                await st.close_unrun(b.id, to)
                await runner.close(b, to)
                return
            await _submit(runner, b, p)
        else:
            if b.status == "cancelling" and not b.upstream_cancelled:
                await _cancel(b, p)
                await st.update_native(b.id, owner, upstream_cancelled=True)
            done = await _poll(runner, b, p)
            if done:
                return
    except GatewayError as exc:
        if exc.retryable or exc.status >= 500:
            log.warning("native batch %s at %s: %s; retried at the next poll", b.id, p.name, exc.message)
        elif b.upstream_id is None and gw.cfg.batches.mode == "auto":
            log.warning("native batch %s: %s refused it (%s); it runs locally", b.id, p.name, exc.message)
            await st.update_native(b.id, owner, mode="local", upstream_status=None, lease_until=None)
            return
        else:
            log.error("native batch %s at %s failed: %s", b.id, p.name, exc.message)
            await st.update_native(b.id, owner, errors=orjson.dumps([{"code": "native_batch_failed",
                                                                      "message": exc.message}]).decode())
            await runner.close(b, "failed")
            return
    await st.update_native(b.id, owner, lease_until=_next_poll(runner))


def _next_poll(runner: "Runner") -> Any:
    import datetime as dt
    return utcnow() + dt.timedelta(seconds=runner.gw.cfg.batches.native_poll_interval)


async def _submit(runner: "Runner", b: BatchRow, p: Any) -> None:
    gw, st, owner = runner.gw, runner.store, runner.owner
    lines = await st.pending_lines(b.id)
    if b.api == "anthropic":
        if b.upstream_status == "submitting":
            log.warning("native batch %s: an earlier submission to %s was interrupted; if it reached Anthropic, "
                        "that Message Batch is an orphan", b.id, p.name)
        await st.update_native(b.id, owner, upstream_status="submitting")
        reqs = [{"custom_id": f"l{ln.idx}", "params": _upstream_body(gw, orjson.loads(ln.body))} for ln in lines]
        got = _json(*await _call(p, "POST", p.url + "/batches", {"requests": reqs}), "create message batch", p)
        await st.update_native(b.id, owner, upstream_id=got["id"], upstream_status=got.get("processing_status"))
        log.info("batch %s submitted to %s as %s (%d lines)", b.id, p.name, got["id"], len(lines))
        return
    base = p.cfg.base_url
    if b.upstream_status == "submitting":  # an interrupted submission: find its vendor batch, if it got there
        found = _json(*await _call(p, "GET", f"{base}/batches?limit=100"), "list batches", p)
        for vb in found.get("data") or ():
            if (vb.get("metadata") or {}).get("helixagent_batch") == b.id:
                await st.update_native(b.id, owner, upstream_id=vb["id"], upstream_status=vb.get("status"))
                return
    await st.update_native(b.id, owner, upstream_status="submitting")
    content = b"".join(orjson.dumps({"custom_id": f"l{ln.idx}", "method": "POST", "url": b.endpoint,
                                     "body": _upstream_body(gw, orjson.loads(ln.body))}) + b"\n" for ln in lines)
    boundary = "helixagent" + os.urandom(12).hex()
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{b.id}.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    f = _json(*await _call(p, "POST", f"{base}/files", raw=form, ctype=f"multipart/form-data; boundary={boundary}"),
              "upload batch input", p)
    got = _json(*await _call(p, "POST", f"{base}/batches", {
        "input_file_id": f["id"], "endpoint": b.endpoint, "completion_window": "24h",
        "metadata": {"helixagent_batch": b.id}}), "create batch", p)
    await st.update_native(b.id, owner, upstream_id=got["id"], upstream_status=got.get("status"))
    log.info("batch %s submitted to %s as %s (%d lines)", b.id, p.name, got["id"], len(lines))


async def _cancel(b: BatchRow, p: Any) -> None:
    url = (f"{p.url}/batches/{b.upstream_id}/cancel" if b.api == "anthropic"
           else f"{p.cfg.base_url}/batches/{b.upstream_id}/cancel")
    _json(*await _call(p, "POST", url, {}), "cancel batch", p)


async def _poll(runner: "Runner", b: BatchRow, p: Any) -> bool:
    """True once the vendor's batch has ended and ours is closed."""
    st, owner = runner.store, runner.owner
    missing: tuple[str, int | None, Any]
    if b.api == "anthropic":
        vb = _json(*await _call(p, "GET", f"{p.url}/batches/{b.upstream_id}"), "retrieve message batch", p)
        await st.update_native(b.id, owner, upstream_status=vb.get("processing_status"))
        if vb.get("processing_status") != "ended":
            return False
        url = vb.get("results_url") or ""
        if not url.startswith(p.url + "/"):  # never send our vendor key anywhere but the vendor's API
            url = f"{p.url}/batches/{b.upstream_id}/results"
        status, data = await _call(p, "GET", url)
        _json(status, b"{}" if status < 300 else data, "message batch results", p)
        mapped = _anthropic_results(data)
        to = "cancelled" if vb.get("cancel_initiated_at") or b.status == "cancelling" else "completed"
        missing = ("cancelled", None, None)
    else:
        base = p.cfg.base_url
        vb = _json(*await _call(p, "GET", f"{base}/batches/{b.upstream_id}"), "retrieve batch", p)
        vstatus = vb.get("status")
        await st.update_native(b.id, owner, upstream_status=vstatus)
        if vstatus not in OPENAI_DONE:
            return False
        mapped = {}
        for key in ("output_file_id", "error_file_id"):
            if vb.get(key):
                status, data = await _call(p, "GET", f"{base}/files/{vb[key]}/content")
                _json(status, b"{}" if status < 300 else data, "download batch results", p)
                mapped.update(_openai_results(data))
        to = {"completed": "completed", "expired": "expired", "cancelled": "cancelled"}.get(vstatus, "failed")
        if to == "failed":
            await st.update_native(b.id, owner, errors=orjson.dumps(
                ((vb.get("errors") or {}).get("data")) or [{"code": "native_batch_failed",
                                                            "message": f"the batch failed at {p.name}"}]).decode())
        missing = {
            "expired": ("expired", None, None), "cancelled": ("cancelled", None, None)}.get(
            to, ("errored", 502, {"error": {"message": f"{p.name}'s batch returned no result for this request",
                                            "type": "server_error", "param": None, "code": "native_batch_missing"}}))
    await _settle(runner, b, p, mapped, missing)
    await runner.close(b, to)
    return True


def _result_rows(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line index, row) of a vendor's JSONL results: our custom ids are ``l<index>``; other rows are skipped."""
    for raw in data.splitlines():
        if not raw.strip():
            continue
        x = orjson.loads(raw)
        cid = str(x.get("custom_id") or "")
        if cid.startswith("l") and cid[1:].isdigit():
            yield int(cid[1:]), x


def _openai_results(data: bytes) -> dict[int, tuple[str, int | None, Any]]:
    out: dict[int, tuple[str, int | None, Any]] = {}
    for idx, x in _result_rows(data):
        resp, err = x.get("response"), x.get("error")
        if resp:
            code = int(resp.get("status_code") or 500)
            out[idx] = ("succeeded" if code < 400 else "errored", code, resp.get("body"))
        elif err:
            c = err.get("code")
            state = "expired" if c == "batch_expired" else "cancelled" if c == "batch_cancelled" else "errored"
            out[idx] = (state, None if state != "errored" else 500, None if state != "errored" else {"error": err})
    return out


def _anthropic_results(data: bytes) -> dict[int, tuple[str, int | None, Any]]:
    out: dict[int, tuple[str, int | None, Any]] = {}
    for idx, x in _result_rows(data):
        r = x.get("result") or {}
        t = r.get("type")
        if t == "succeeded":
            out[idx] = ("succeeded", 200, r.get("message"))
        elif t == "errored":
            out[idx] = ("errored", 400, r.get("error"))
        else:
            out[idx] = ("expired" if t == "expired" else "cancelled", None, None)
    return out


def _usage(body: Any) -> tuple[int, int]:
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return 0, 0
    i = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
    o = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
    return int(i), int(o)


async def _settle(runner: "Runner", b: BatchRow, p: Any, mapped: dict[int, tuple[str, int | None, Any]],
                  missing: tuple[str, int | None, Any]) -> None:
    """Every pending line's result, and a completion record for each line the vendor ran."""
    gw, st = runner.gw, runner.store
    lines: list[Claimed] = await st.pending_lines(b.id)
    ident = await runner.identity(b)
    target = TARGETS[b.endpoint]
    discount = gw.cfg.batches.native_discount
    writer = getattr(gw.services.get("records"), "writer", None)
    rows = []
    for ln in lines:
        state, code, body = mapped.get(ln.idx, missing)
        rid = request_id_of(b.id, ln.idx, ln.gen)
        i, o = _usage(body) if state in ("succeeded", "errored") else (0, 0)
        rows.append({"idx": ln.idx, "state": state, "status_code": code, "request_id": rid, "result": body,
                     "input_tokens": i, "output_tokens": o})
        if code is None or writer is None:
            continue  # not run at the vendor: no record
        ctx = RequestContext(target.endpoint, target.client_format, request_id=rid)
        ctx.identity = None if isinstance(ident, GatewayError) else ident
        ctx.path, ctx.user_agent, ctx.raw_body = b.endpoint, "helixagent-batch-native", ln.body
        model = _upstream_body(gw, orjson.loads(ln.body)).get("model")
        ctx.provider, ctx.upstream_model = p.name, model
        ctx.usage = Usage(i, o, i + o)
        c = cost_of(price(p.cfg, str(model)), i, o)
        ctx.cost = (c or 0.0) * discount
        ctx.status = ctx.status_sent = code
        if code >= 400:
            ctx.error = GatewayError(code, "the vendor's batch answered this request with an error",
                                     provider=p.name, kind="upstream_error")
        ctx.outcome = "completed" if code < 400 else "error"
        ctx.finished_at = ctx.started
        writer.record(ctx)
    await st.settle_lines(b.id, rows)
