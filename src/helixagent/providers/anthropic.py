"""Anthropic wire format: the Messages API (``POST {base_url}/v1/messages``).

``base_url`` is what the Anthropic SDK takes (``https://api.anthropic.com``); a base_url that already
ends in ``/v1`` is accepted too.  Auth is ``x-api-key``; ``anthropic-version`` is ``api_version`` from
the provider config or ``2023-06-01``.  A client's ``anthropic-beta`` header (``ChatRequest.anthropic_beta``,
set by the ``/v1/messages`` ingress) is sent on, after any ``anthropic-beta`` configured in ``headers``, and
so is the client's query string (``?beta=true``, ``ChatRequest.anthropic_query``, re-encoded).
The request/response/stream mapping lives in
:mod:`helixagent.providers.anthropic_mapping` (shared with the ``/v1/messages`` ingress); this module
does the HTTP, the SSE decoding and the error mapping.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..canonical import ChatRequest, ChatResponse, replay_chunks, usage_chunk
from ..config import HTTPConfig, ProviderConfig
from .anthropic_mapping import (AnthropicStreamDecoder, AnthropicStreamError, anthropic_response_to_canonical,
                                canonical_to_anthropic_request)
from .base import MappedProvider, iter_chunks
from .sse import sse_from_chunks

DEFAULT_VERSION = "2023-06-01"


class AnthropicProvider(MappedProvider):
    wire = "anthropic"

    def __init__(self, cfg: ProviderConfig, http: HTTPConfig):
        super().__init__(cfg, http)
        h = {"content-type": "application/json", "accept": "application/json",
             "anthropic-version": cfg.api_version or DEFAULT_VERSION}
        if cfg.api_key:
            h["x-api-key"] = cfg.api_key
        h.update(cfg.headers)
        self.headers = h
        self.stream_headers = dict(h, accept="text/event-stream")
        self._beta = {k: v for k, v in h.items() if k.lower() == "anthropic-beta"}
        base = cfg.base_url or ""
        self.url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"

    def headers_for(self, req: ChatRequest, stream: bool) -> dict[str, str]:
        h = self.stream_headers if stream else self.headers
        beta = req.anthropic_beta
        if not beta:
            return h
        h = dict(h)
        conf = ""
        for k, v in self._beta.items():  # configured betas first, the client's appended (no duplicates)
            conf = v
            del h[k]
        have = [b.strip() for b in conf.split(",") if b.strip()]
        have.extend(b for b in (x.strip() for x in beta.split(",")) if b and b not in have)
        h["anthropic-beta"] = ",".join(have)
        return h

    def url_for(self, req: ChatRequest) -> str:
        """The Messages URL, with the client's query (``?beta=true``) when it came through /v1/messages."""
        q = req.anthropic_query
        return f"{self.url}?{q}" if q else self.url

    def body(self, req: ChatRequest, stream: bool) -> bytes:
        b = canonical_to_anthropic_request(req, self.cfg.default_max_tokens, self.unsupported, stream=stream)
        return orjson.dumps(b)

    def prepare(self, req: Any, op: str) -> Any:
        if op == "embed":
            return None  # embed() answers "unsupported" (a 400) without an upstream call
        return self.body(req, op == "stream")

    async def send(self, req: Any, op: str, wire: Any) -> Any:
        if op == "embed":
            return await self.embed(req)
        if op == "stream":
            resp = await self.open_sse(self.url_for(req), wire, self.headers_for(req, True))
            if self.is_json_answer(resp):  # a whole Message answered to a streamed request
                msg = await self.json_answer(resp)
                return iter_chunks(self.read_answer(self._message_chunks, msg, resp.headers))
            return self._chunks(resp, req.model)
        msg, headers, data = await self.post_json(self.url_for(req), wire, self.headers_for(req, False))
        body, usage = self.read_answer(self._message, msg, headers, data)
        return ChatResponse(body, usage, self.name, body["model"] or req.model)

    def _message(self, msg: Any, headers: Any, data: bytes | None = None) -> tuple[dict[str, Any], Any]:
        if not isinstance(msg, dict) or msg.get("type") != "message" or not isinstance(msg.get("content"), list):
            if isinstance(msg, dict) and msg.get("type") == "error":
                raise self.upstream_error(500, data if data is not None else orjson.dumps(msg), headers)
            raise self.bad_body()
        return anthropic_response_to_canonical(msg)

    def _message_chunks(self, msg: Any, headers: Any) -> list[dict[str, Any]]:
        body, usage = self._message(msg, headers)
        out = replay_chunks(ChatResponse(body, usage, self.name, body["model"]))
        uc = usage_chunk(body["id"], body["model"], body["created"], usage)
        uc["usage"] = body["usage"]
        out.append(uc)
        return out

    async def _chunks(self, resp: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        dec = AnthropicStreamDecoder(model)
        events = sse_from_chunks(resp.chunks())
        try:
            async for _event, data in events:
                ev = self.stream_event(data)
                if not isinstance(ev, dict):
                    continue
                try:
                    out = self.read_answer(dec.feed, ev)
                except AnthropicStreamError as exc:
                    err = self.upstream_error(exc.status, b"", None, message=exc.message, etype=exc.etype)
                    err.kind = "stream_error" if dec.started else err.kind
                    raise err from None
                for c in out:
                    yield c
                if dec.done:
                    break
        finally:
            await events.aclose()  # a break leaves the generators suspended: close them now
            resp.close()
        if not dec.done:
            raise self.stream_error("ended the stream without message_stop")
