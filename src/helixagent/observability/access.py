"""The access log: one line per request, written by the observability stage when the request is done.

JSON format: the line is one dict, serialised once with orjson and written straight to the handler that
:func:`~helixagent.observability.logs.configure_logging` installed (no LogRecord, no formatter), in
batches at most 50 ms old (flushed at shutdown too).  Console
format and any other set-up go through the ``helixagent.access`` logger as usual.  Nothing is built when
the logger's level filters INFO out.

Never in a line: the client's key, an upstream key (error messages are scrubbed of both and of anything
key-shaped), request or response bodies unless ``logging.include_bodies`` is true.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import orjson

from ..millis import ms3
from . import logs

INFO = logging.INFO
# JSON lines are written in batches: at most FLUSH_DELAY seconds after the first of a batch, or at once
# when MAX_BATCH are pending (a write + flush per line would cost more CPU than everything else here).
FLUSH_DELAY = 0.05
MAX_BATCH = 256
_KEYLIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|sk-ant-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,}|"
                      r"hk-[A-Za-z0-9_\-]{6,}|hx-[A-Za-z0-9_\-]{6,}|(?i:bearer)\s+[A-Za-z0-9_\-\.=+/]{6,})")

_ts_sec = -1
_ts_prefix = ""


def timestamp(now: float) -> str:
    """ISO-8601 UTC with milliseconds; the part up to the second is formatted once per second."""
    global _ts_sec, _ts_prefix
    sec = int(now)
    if sec != _ts_sec:
        _ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_sec = sec
    return "%s.%03dZ" % (_ts_prefix, int((now - sec) * 1000))


class AccessLog:
    def __init__(self, cfg: Any, secrets: list[str]):
        lc = cfg.logging
        self.logger = logging.getLogger("helixagent.access")
        self.fields: tuple[str, ...] | None = tuple(lc.fields) if lc.fields else None
        self.include_bodies = bool(lc.include_bodies)
        self.console = lc.format == "console"
        # the secrets this process knows, longest first (a key that contains another is replaced whole)
        self._buf = bytearray()  # pending JSON lines (copied in: the line objects are freed at once)
        self._pending = 0
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "****")
        return _KEYLIKE.sub("****", text)

    def record(self, ctx: Any, now: float) -> dict[str, Any]:
        ident = ctx.identity
        u = ctx.usage
        err = ctx.error
        fa = ctx.first_token_at
        ul = ctx.upstream_latency
        d: dict[str, Any] = {
            "timestamp": timestamp(now),
            "level": "info",
            "logger": "helixagent.access",
            "method": ctx.method,
            "path": ctx.path,
            "ip": ctx.ip,
            "user_agent": ctx.user_agent,
            "response_time": ms3(ctx.latency),
            "status_code": ctx.status,
            "request_id": ctx.request_id,
            "client_request_id": ctx.client_request_id,
            "endpoint": ctx.endpoint,
            "provider": ctx.provider,
            "model": ctx.upstream_model,
            "stream": ctx.streamed,
            "tokens": None if u is None else {"prompt": u.prompt_tokens, "completion": u.completion_tokens,
                                              "total": u.total_tokens or (u.prompt_tokens + u.completion_tokens)},
            "cost": ctx.cost,
            "cache": ctx.cache_status,
            "key_id": None if ident is None else ident.key_id,
            "user": None if ident is None else ident.user_id,
            "application": None if ident is None else ident.application,
            "error": None if err is None else {"status": err.status, "type": err.openai_type(), "code": err.code,
                                               "kind": err.kind, "message": self.scrub(err.message)},
            "fallbacks": ctx.fallbacks,
            "retries": ctx.retries,
            "ttft": None if fa is None else ms3(fa - ctx.started),
            "upstream_latency": None if ul is None else ms3(ul),
        }
        sel = self.fields
        if sel is not None:
            d = {"level": "info", "logger": "helixagent.access", **{k: d[k] for k in sel}}
        if self.include_bodies:
            self._bodies(ctx, d)
        return d

    def _bodies(self, ctx: Any, d: dict[str, Any]) -> None:
        raw = ctx.raw_body
        if raw:
            if ctx.request is not None:  # parsed, so valid JSON: embed it without re-encoding
                d["request_body"] = orjson.Fragment(raw)
            else:
                d["request_body"] = raw[:65536].decode("utf-8", "replace")
        resp = ctx.response
        body = getattr(resp, "body", None)
        if body is not None:
            d["response_body"] = body

    def flush(self) -> None:
        """Write the pending JSON lines in one go (bytes straight to the stream's binary buffer)."""
        buf = self._buf
        if not buf:
            return
        data = bytes(buf)
        buf.clear()
        self._pending = 0
        sink = logs.SINK
        if sink is None:
            return
        sink.acquire()
        try:
            stream = sink.stream  # type: ignore[attr-defined]
            raw = getattr(stream, "buffer", None)
            if raw is not None:
                stream.flush()  # whatever the text layer holds goes first, so lines stay in order
                raw.write(data)
                raw.flush()
            else:
                stream.write(data.decode())
                stream.flush()
        except Exception:  # noqa: BLE001 - a log handler: logging's own handleError reports it
            sink.handleError(logging.makeLogRecord({"msg": "access log write failed"}))
        finally:
            sink.release()

    def emit(self, ctx: Any) -> None:
        logger = self.logger
        if not logger.isEnabledFor(INFO):
            return
        now = time.time()
        d = self.record(ctx, now)
        sink = logs.SINK
        if sink is not None and not self.console and sink.level <= INFO:
            buf = self._buf
            buf += orjson.dumps(d, default=str)
            buf += b"\n"
            self._pending += 1
            if self._pending == 1:
                # the first line of a batch: write the batch out in FLUSH_DELAY (or at once off-loop)
                try:
                    asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
                except RuntimeError:
                    self.flush()
            elif self._pending >= MAX_BATCH:
                self.flush()
            return
        if self.console:
            tok = d.get("tokens")
            err = d.get("error")
            msg = "%s %s %s %.1fms %s/%s%s%s rid=%s" % (
                ctx.method, ctx.path, ctx.status, ctx.latency * 1000.0, ctx.provider or "-", ctx.upstream_model or "-",
                f" tokens={tok['prompt']}+{tok['completion']}" if tok else "",
                f" error={err['code'] or err['type']}: {err['message']}" if err else "",
                ctx.request_id + (f" client_rid={ctx.client_request_id}" if ctx.client_request_id else ""))
            logger.info(msg)
        else:
            d.pop("level", None)
            d.pop("logger", None)
            d.pop("timestamp", None)
            logger.info("request", extra={"fields": d})
