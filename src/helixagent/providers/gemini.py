"""The Gemini provider: endpoints, headers, errors and streaming over HTTP.  The translation between the
canonical model and Gemini's wire format is in :mod:`helixagent.providers.gemini_mapping`."""
from __future__ import annotations

import base64
import struct
from typing import Any, AsyncIterator

import orjson

from ..canonical import (ChatResponse, EmbeddingRequest, EmbeddingResponse, Usage, replay_chunks,
                         usage_chunk)
from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError, bad_request
from ..tokens import estimate_text
from .base import MappedProvider, iter_chunks
from .checks import check_embedding
from .gemini_mapping import (_GOOGLE_STATUS, GeminiStreamDecoder, StreamErrorEvent, canonical_to_gemini_request,
                             gemini_response_to_canonical, google_error)
from .sse import sse_from_chunks

__all__ = ["GeminiProvider"]


def _vectors(vecs: list[Any], fmt: str) -> list[dict[str, Any]]:
    out = []
    for i, v in enumerate(vecs):
        values = v.get("values") or []
        emb: Any = values
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        out.append({"object": "embedding", "index": i, "embedding": emb})
    return out


class GeminiProvider(MappedProvider):
    wire = "gemini"

    def __init__(self, cfg: ProviderConfig, http: HTTPConfig):
        super().__init__(cfg, http)
        h = {"content-type": "application/json", "accept": "application/json"}
        if cfg.api_key:
            h["x-goog-api-key"] = cfg.api_key
        h.update(cfg.headers)
        self.headers = h
        self.stream_headers = dict(h, accept="text/event-stream")
        base = cfg.base_url or ""
        self.root = base if base.endswith(("/v1beta", "/v1")) else base + "/v1beta"
        self._urls: dict[tuple[str, str], str] = {}

    def url(self, model: str, method: str) -> str:
        key = (model, method)
        u = self._urls.get(key)
        if u is None:
            m = model[7:] if model.startswith("models/") else model
            from urllib.parse import quote
            u = f"{self.root}/models/{quote(m, safe='-._~')}:{method}"
            if len(self._urls) < 1024:
                self._urls[key] = u
        return u

    def map_error(self, status: int, data: bytes, headers: Any = None) -> GatewayError:
        msg, gstatus, reason, delay = google_error(data)
        if (reason in ("API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED")
                or gstatus in ("UNAUTHENTICATED", "PERMISSION_DENIED")):
            status = 401
        elif status in (200, 0) or status >= 600:
            status = _GOOGLE_STATUS.get(gstatus or "", 502)
        err = self.upstream_error(status, data, headers, message=msg or gstatus or f"HTTP {status}", etype=None)
        if err.retry_after is None and delay is not None and err.retryable:
            err.retry_after = delay
        return err

    # -- the wire request (mapping) and the exchange --------------------------------------------------
    def prepare(self, req: Any, op: str) -> Any:
        if op == "embed":
            return self._embed_request(req)
        return orjson.dumps(canonical_to_gemini_request(req, self.unsupported))

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        res: EmbeddingResponse = await self.send(req, "embed", self.prepare(req, "embed"))
        return res

    async def send(self, req: Any, op: str, wire: Any) -> Any:
        if op == "embed":
            return await self._embed(req, *wire)
        if op == "stream":
            resp = await self.open_sse(self.url(req.model, "streamGenerateContent") + "?alt=sse", wire,
                                       self.stream_headers)
            if self.is_json_answer(resp):  # a GenerateContentResponse (or an array of them) answered whole
                return iter_chunks(self.read_answer(self._json_chunks, await self.json_answer(resp), req.model))
            return self._chunks(resp, req.model)
        resp, _, _ = await self.post_json(self.url(req.model, "generateContent"), wire, self.headers)
        out, usage = self.read_answer(gemini_response_to_canonical, resp, req.model, self.name)
        return ChatResponse(out, usage, self.name, out["model"])

    def _json_chunks(self, body: Any, model: str) -> list[dict[str, Any]]:
        if isinstance(body, dict):
            if "error" in body and "candidates" not in body:
                err = body["error"] if isinstance(body["error"], dict) else {"message": str(body["error"])}
                code = err.get("code")
                raise self.map_error(code if isinstance(code, int) else 0, orjson.dumps({"error": err}))
            out, usage = gemini_response_to_canonical(body, model, self.name)
            chunks = replay_chunks(ChatResponse(out, usage, self.name, out["model"]))
            uc = usage_chunk(out["id"], out["model"], out["created"], usage)
            uc["usage"] = out["usage"]
            chunks.append(uc)
            return chunks
        if not isinstance(body, list):
            raise self.bad_body()
        dec = GeminiStreamDecoder(model, self.name)
        chunks = []
        for e in body:
            if not isinstance(e, dict):
                raise self.bad_body()
            try:
                chunks.extend(dec.feed(e))
            except StreamErrorEvent as exc:
                code = exc.err.get("code")
                raise self.map_error(code if isinstance(code, int) else 0, orjson.dumps({"error": exc.err})) from None
        if not dec.finished:
            raise self.stream_error("answered a stream with JSON that has no finishReason")
        chunks.append(dec.final())
        return chunks

    async def _chunks(self, resp: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        dec = GeminiStreamDecoder(model, self.name)
        events = sse_from_chunks(resp.chunks())
        try:
            async for _event, data in events:
                ev = self.stream_event(data)
                if isinstance(ev, list):  # a JSON-array stream (no alt=sse): treat items as events
                    evs = ev
                else:
                    evs = [ev]
                for e in evs:
                    if not isinstance(e, dict):
                        continue
                    try:
                        out = self.read_answer(dec.feed, e)
                    except StreamErrorEvent as exc:
                        code = exc.err.get("code")
                        raise self.map_error(code if isinstance(code, int) else 0,
                                             orjson.dumps({"error": exc.err})) from None
                    for c in out:
                        yield c
        finally:
            await events.aclose()  # a break leaves the generators suspended: close them now
            resp.close()
        if not dec.finished:
            raise self.stream_error("ended the stream before a finishReason")
        yield self.read_answer(dec.final)

    # -- embeddings --------------------------------------------------------------------------------
    def _embed_request(self, req: EmbeddingRequest) -> tuple[str, bytes, list[str], str]:
        check_embedding(req)
        inputs: list[Any] | str = req.input
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise self.unsupported("token-array embedding input (send strings)", "input")
        p = req.params
        extra: dict[str, Any] = {}
        fmt = "float"
        for k, v in p.items():
            if v is None or k == "user":
                continue
            if k == "dimensions":
                extra["outputDimensionality"] = v
            elif k == "encoding_format":
                if v not in ("float", "base64"):
                    raise bad_request("'encoding_format' must be float or base64", param=k, code="invalid_value")
                fmt = v
            elif k in ("task_type", "taskType"):
                if not isinstance(v, str):
                    raise bad_request(f"'{k}' must be a string", param=k, code="invalid_type")
                extra["taskType"] = v
            else:
                extra[k] = v
        m = req.model[7:] if req.model.startswith("models/") else req.model
        if len(inputs) == 1:
            url = self.url(m, "embedContent")
            body = {"model": f"models/{m}", "content": {"parts": [{"text": inputs[0]}]}, **extra}
        else:
            url = self.url(m, "batchEmbedContents")
            body = {"requests": [{"model": f"models/{m}", "content": {"parts": [{"text": t}]}, **extra}
                                 for t in inputs]}
        return url, orjson.dumps(body), inputs, fmt

    async def _embed(self, req: EmbeddingRequest, url: str, wire: bytes, inputs: list[str],
                     fmt: str) -> EmbeddingResponse:
        resp, _, _ = await self.post_json(url, wire, self.headers)
        vecs = [resp["embedding"]] if "embedding" in resp else resp.get("embeddings")
        if not isinstance(vecs, list) or len(vecs) != len(inputs):
            raise GatewayError(502, f"provider {self.name!r} returned {len(vecs or [])} embeddings for "
                               f"{len(inputs)} inputs", provider=self.name, retryable=True, kind="bad_upstream_body")
        data_out = self.read_answer(_vectors, vecs, fmt)
        # The Gemini embedding API reports no token counts; usage is the local estimate (tokens.py).
        tokens = sum(estimate_text(t) for t in inputs)
        usage = Usage(tokens, 0, tokens)
        return EmbeddingResponse({"object": "list", "data": data_out, "model": req.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, usage, self.name)
