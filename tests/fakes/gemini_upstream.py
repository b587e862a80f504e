"""A fake Gemini API (generativelanguage v1beta), written to the documented wire format, over real HTTP.

Serves ``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse`` (SSE, one
GenerateContentResponse per event, the last with finishReason and usageMetadata, no terminator),
``:embedContent`` and ``:batchEmbedContents``.  The key is checked in ``x-goog-api-key`` (a wrong key is
Google's 400 INVALID_ARGUMENT with reason API_KEY_INVALID).  Requests are validated like the API does
(unknown field names, roles, Schema keywords, functionResponse without a matching functionCall).

Behaviour: with function declarations and mode != NONE the model calls the first (or the only allowed)
function with ``{"q": <last user text>}`` (or, when :attr:`FakeGemini.tool_args` is set, with exactly those
arguments and only while the contents hold no ``functionResponse``: a scripted tool loop); otherwise it echoes the last user text.  A prompt containing
``BLOCKME`` is blocked (``promptFeedback.blockReason: SAFETY``, no candidates); ``UNSAFE`` ends the
candidate with finishReason SAFETY.

Faults: ``Fault(status=429)`` (RESOURCE_EXHAUSTED with a RetryInfo detail), ``Fault(status=400)``
(INVALID_ARGUMENT), ``Fault(status=503)`` (UNAVAILABLE), ``Fault(error_after=2)`` (an error object in
the stream), ``Fault(cut_after=2)``, ``Fault(reset=True)``, ``Fault(delay=...)``, ``Fault(json_answer=True)``
(a streamed request answered with one plain JSON GenerateContentResponse, as without ``alt=sse``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from fakes.anthropic_upstream import Fault
from support.servers import AiohttpServer

STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
          500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_TOP = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
        "cachedContent", "labels"}
_GEN = {"temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences", "presencePenalty",
        "frequencyPenalty", "seed", "responseMimeType", "responseSchema", "thinkingConfig", "responseLogprobs",
        "logprobs", "responseModalities"}
_SCHEMA = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
           "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
           "propertyOrdering", "default", "items", "minimum", "maximum"}


def google_error(status: int, message: str | None = None, reason: str | None = None,
                 retry_delay: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": status, "message": message or {
        429: "Resource has been exhausted (e.g. check quota).", 503: "The model is overloaded. Please try again later.",
        500: "An internal error has occurred."}.get(status, f"error {status}"), "status": STATUS.get(status, "UNKNOWN")}
    details = []
    if reason:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                        "domain": "googleapis.com"})
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    if details:
        err["details"] = details
    return {"error": err}


def _schema_problem(s: Any, path: str) -> str | None:
    if not isinstance(s, dict):
        return None
    for k, v in s.items():
        if k not in _SCHEMA:
            return f'Invalid JSON payload received. Unknown name "{k}" at \'{path}\': Cannot find field.'
        if k == "properties":
            for pk, pv in v.items():
                p = _schema_problem(pv, f"{path}.properties[{pk}].value")
                if p:
                    return p
        if k == "items":
            p = _schema_problem(v, path + ".items")
            if p:
                return p
    if s.get("type") in ("object", "OBJECT") and "properties" in s and not s["properties"]:
        return f"* GenerateContentRequest.{path}.properties: should be non-empty for OBJECT type"
    return None


class FakeGemini:
    def __init__(self, api_key: str = "AIzaSyFAKE-test-upstream-key-1234567890", words: int = 5):
        self.api_key = api_key
        self.words = words
        self.calls: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.thoughts = 0   # thoughtsTokenCount to report
        self.signature: str | None = None  # thoughtSignature to attach to function calls
        self.tool_args: dict[str, Any] | None = None  # scripted tool loop (see the module docstring)
        app = web.Application()
        app.router.add_post("/v1beta/models/{target}", self.dispatch)
        self.server = AiohttpServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.calls.clear()
        self.faults.clear()
        self.thoughts = 0
        self.signature = None
        self.tool_args = None

    def close(self) -> None:
        self.server.close()

    def provider(self, name: str = "gemini", **extra: Any) -> dict[str, Any]:
        d = {"name": name, "type": "gemini", "base_url": self.url, "api_key": self.api_key,
             "models": ["gemini-2.0-flash", "gemini-2.5-flash", "text-embedding-004"], "priority": 1}
        d.update(extra)
        return d

    def _error(self, status: int, message: str | None = None, reason: str | None = None,
               headers: dict[str, str] | None = None, retry_delay: str | None = None) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(google_error(status, message, reason, retry_delay)),
                            content_type="application/json", headers=headers or {})

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        target = request.match_info["target"]
        model, _, method = target.partition(":")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(400, "Invalid JSON payload received.")
        self.calls.append({"path": request.path, "query": dict(request.query), "model": model, "method": method,
                           "body": body, "headers": {k.lower(): v for k, v in request.headers.items()}, "t": time.time()})
        if request.headers.get("x-goog-api-key") != self.api_key:
            return self._error(400, "API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID")
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            if fault.hang:
                await asyncio.sleep(3600)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            if fault.status:
                return self._error(fault.status, fault.message, headers=fault.headers,
                                   retry_delay="7s" if fault.status == 429 else None)
        if model == "missing-model":
            return self._error(404, f"models/{model} is not found for API version v1beta, or is not supported "
                                    "for generateContent.")
        if method in ("generateContent", "streamGenerateContent"):
            if method == "streamGenerateContent" and request.query.get("alt") != "sse":
                return self._error(400, "this fake only streams with alt=sse")
            return await self.generate(request, model, body, method == "streamGenerateContent", fault)
        if method == "embedContent":
            return self.embed([body], model)
        if method == "batchEmbedContents":
            return self.embed(body.get("requests") or [], model, batch=True)
        return self._error(404, f"unknown method {method}")

    # -- generateContent ---------------------------------------------------------------------------
    @staticmethod
    def _invalid(body: dict[str, Any]) -> str | None:
        for k in body:
            if k not in _TOP:
                return f'Invalid JSON payload received. Unknown name "{k}": Cannot find field.'
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        calls: list[str] = []
        for i, c in enumerate(contents):
            if c.get("role") not in ("user", "model"):
                return f"Please use a valid role: user, model. (contents[{i}])"
            if not c.get("parts"):
                return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            for p in c["parts"]:
                keys = set(p) - {"thoughtSignature", "thought"}
                if len(keys) != 1 or not keys <= {"text", "inlineData", "fileData", "functionCall", "functionResponse"}:
                    return f"Invalid part in contents[{i}]: {sorted(p)}"
                if "functionCall" in p:
                    if c["role"] != "model":
                        return "functionCall parts must be in a model turn"
                    calls.append(p["functionCall"]["name"])
                if "functionResponse" in p and p["functionResponse"].get("name") not in calls:
                    return ("Please ensure that function response turn comes immediately after a function call turn. "
                            "And the number of function response parts should be equal to number of function call parts")
                if "functionResponse" in p and not isinstance(p["functionResponse"].get("response"), dict):
                    return "functionResponse.response must be an object"
        for k in body.get("generationConfig") or {}:
            if k not in _GEN:
                return f'Invalid JSON payload received. Unknown name "{k}" at \'generation_config\': Cannot find field.'
        gc = body.get("generationConfig") or {}
        if len(gc.get("stopSequences") or ()) > 5:
            return "stop_sequences must have at most 5 entries"
        if gc.get("responseSchema"):
            p = _schema_problem(gc["responseSchema"], "generation_config.response_schema")
            if p:
                return p
        for t in body.get("tools") or ():
            for j, d in enumerate(t.get("functionDeclarations") or ()):
                if "parameters" in d:
                    p = _schema_problem(d["parameters"], f"tools[0].function_declarations[{j}].parameters")
                    if p:
                        return p
        return None

    @staticmethod
    def _last_user_text(body: dict[str, Any]) -> str:
        for c in reversed(body["contents"]):
            if c["role"] != "user":
                continue
            texts = [p["text"] for p in c["parts"] if "text" in p]
            if texts:
                return " ".join(texts)
            res = [p["functionResponse"] for p in c["parts"] if "functionResponse" in p]
            if res:
                return str(res[0]["response"].get("content", ""))
        return ""

    async def generate(self, request: web.Request, model: str, body: dict[str, Any], stream: bool,
                       fault: Fault | None) -> web.StreamResponse:
        problem = self._invalid(body)
        if problem:
            return self._error(400, problem)
        text = self._last_user_text(body)
        prompt_tokens = sum(len(str(c)) // 8 + 1 for c in body["contents"])
        if "BLOCKME" in text:
            resp = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]},
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "modelVersion": model}
            if stream:
                return await self._sse(request, [resp], fault)
            return web.json_response(resp)
        gc = body.get("generationConfig") or {}
        words = [f"echo:{w}" for w in text.split()][: self.words] or ["ok"]
        finish = "STOP"
        mt = gc.get("maxOutputTokens")
        if mt and len(words) > mt:
            words, finish = words[:mt], "MAX_TOKENS"
        if "UNSAFE" in text:
            finish = "SAFETY"
        decls = [d for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()]
        fcc = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        call = None
        answered = self.tool_args is not None and any(
            "functionResponse" in p for c in body["contents"] for p in c["parts"])
        if decls and fcc.get("mode", "AUTO") != "NONE" and not answered:
            allowed = fcc.get("allowedFunctionNames")
            d = next((x for x in decls if x["name"] in allowed), decls[0]) if allowed else decls[0]
            call = {"name": d["name"], "args": self.tool_args if self.tool_args is not None else {"q": text}}
        n = gc.get("candidateCount") or 1
        out_tokens = len(words) if call is None else 9
        usage: dict[str, Any] = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": out_tokens * n,
                                 "totalTokenCount": prompt_tokens + out_tokens * n + self.thoughts}
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        rid = f"resp-fake-{len(self.calls)}"

        def parts_for() -> list[dict[str, Any]]:
            if call is not None:
                p: dict[str, Any] = {"functionCall": dict(call)}
                if self.signature:
                    p["thoughtSignature"] = self.signature
                return [p]
            return [{"text": " ".join(words)}]

        if not stream or (fault is not None and fault.json_answer):
            cands = [{"content": {"parts": parts_for(), "role": "model"}, "finishReason": finish, "index": i}
                     for i in range(n)]
            return web.json_response({"candidates": cands, "usageMetadata": usage, "modelVersion": model,
                                      "responseId": rid})
        events: list[dict[str, Any]] = []
        if call is not None:
            events.append({"candidates": [{"content": {"parts": parts_for(), "role": "model"}, "index": 0}],
                           "modelVersion": model, "responseId": rid})
        else:
            for k, w in enumerate(words):
                events.append({"candidates": [{"content": {"parts": [{"text": w if k == 0 else " " + w}],
                                                           "role": "model"}, "index": 0}],
                               "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                               "modelVersion": model, "responseId": rid})
        last = events[-1]
        last["candidates"][0]["finishReason"] = finish
        last["usageMetadata"] = usage
        return await self._sse(request, events, fault)

    async def _sse(self, request: web.Request, events: list[dict[str, Any]], fault: Fault | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, ev in enumerate(events):
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if fault is not None and fault.error_after is not None and i >= fault.error_after:
                await resp.write(b"data: " + orjson.dumps(google_error(503)) + b"\r\n\r\n")
                await resp.write_eof()
                return resp
            await resp.write(b"data: " + orjson.dumps(ev) + b"\r\n\r\n")
        await resp.write_eof()
        return resp

    # -- embeddings --------------------------------------------------------------------------------
    def embed(self, reqs: list[dict[str, Any]], model: str, batch: bool = False) -> web.Response:
        out = []
        for r in reqs:
            if batch and r.get("model") != f"models/{model}":
                return self._error(400, f"Model {r.get('model')} in the request does not match {model}")
            parts = (r.get("content") or {}).get("parts") or []
            if not parts:
                return self._error(400, "* EmbedContentRequest.content: contents is not specified")
            text = " ".join(p.get("text", "") for p in parts)
            dims = r.get("outputDimensionality") or 6
            out.append({"values": [round((len(text) * (j + 1)) % 97 / 97, 6) for j in range(dims)]})
        if batch:
            return web.json_response({"embeddings": out})
        return web.json_response({"embedding": out[0]})
