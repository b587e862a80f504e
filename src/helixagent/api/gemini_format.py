"""The Gemini API client format (the ingress direction; the provider direction is
``providers/gemini_mapping.py``): parse ``generateContent`` / ``streamGenerateContent`` / ``countTokens`` /
``embedContent`` / ``batchEmbedContents`` bodies into the canonical model, render canonical answers as
``GenerateContentResponse`` objects, canonical chunks as Gemini stream frames (SSE with ``alt=sse``, else
the JSON-array stream) and errors in Google's shape.  See docs/gemini-api.md.

Mapping decisions:

* ``contents`` roles ``user``/``function`` -> user (``functionResponse`` parts -> ``tool`` messages, matched
  to the previous model turn's calls by id, else by name), ``model`` -> assistant (``functionCall`` parts ->
  ``tool_calls``; a call without an id gets a deterministic ``call_<turn>_<part>``).  ``thoughtSignature``
  on a call rides in the tool call id (``<id>~ts~<sig>``, as the Gemini provider does) and is stripped for
  other providers; earlier ``thought`` text is dropped (no upstream takes reasoning back).
* Gemini Schema objects (``parameters``, ``responseSchema``, upper-case types) become JSON Schema;
  ``parametersJsonSchema`` / ``responseJsonSchema`` are taken as they are.
* Fields only a Gemini upstream can serve (``cachedContent``, native tools such as ``googleSearch``, unknown
  ``generationConfig`` fields) are added to the request when the router's first choice is a Gemini provider
  and are a 400 naming the field otherwise; hints with no meaning elsewhere (``safetySettings``, ``labels``,
  ``thinkingConfig``, ``topK`` for OpenAI, penalties for Anthropic) are dropped and named in the
  ``x-helixagent-dropped-params`` response header.
"""
from __future__ import annotations

import time
from typing import Any

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest, Usage, text_of
from ..errors import GatewayError, bad_request
from ..providers.gemini_mapping import SIG_SEP
from .openai_format import HELIX_FIELDS, load_json_object, split_model
from .schemas.gemini import check_batch_embed, check_count, check_embed, check_generate

ACTIONS = ("generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents")
DROPPED_HEADER = "x-helixagent-dropped-params"

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
           499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY", "tool_calls": "STOP",
           "function_call": "STOP"}
# canonical parameter names -> the Gemini field a client sent (for errors raised after translation)
_FIELD = {"temperature": "generationConfig.temperature", "top_p": "generationConfig.topP",
          "top_k": "generationConfig.topK", "n": "generationConfig.candidateCount",
          "max_tokens": "generationConfig.maxOutputTokens", "stop": "generationConfig.stopSequences",
          "presence_penalty": "generationConfig.presencePenalty",
          "frequency_penalty": "generationConfig.frequencyPenalty", "seed": "generationConfig.seed",
          "response_format": "generationConfig.responseSchema", "tool_choice": "toolConfig", "tools": "tools"}
_KINDS = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_PART_META = frozenset(("thought", "thoughtSignature"))
_TOP = frozenset(("contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
                  "cachedContent", "labels", "model", *HELIX_FIELDS))
_GEN_MAPPED = {"temperature": "temperature", "topP": "top_p", "topK": "top_k", "candidateCount": "n",
               "maxOutputTokens": "max_tokens", "stopSequences": "stop", "seed": "seed",
               "presencePenalty": "presence_penalty", "frequencyPenalty": "frequency_penalty"}
# Gemini-only fields other providers can do without (dropped there, named in the response header)
_DROPPABLE = frozenset(("safetySettings", "labels", "generationConfig.thinkingConfig",
                        "generationConfig.mediaResolution"))


def _err(path: str, message: str, code: str = "invalid_value") -> GatewayError:
    return bad_request(f"'{path}': {message}", param=path, code=code)


# -- errors ------------------------------------------------------------------------------------------

def google_body(err: GatewayError) -> dict[str, Any]:
    """A gateway error in Google's shape: ``{"error": {"code", "message", "status", "details"}}``."""
    status = _STATUS.get(err.status) or ("INTERNAL" if err.status >= 500 else "INVALID_ARGUMENT")
    info: dict[str, Any] = {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": (err.code or err.kind or status).upper(), "domain": "helixagent"}
    if err.provider:
        info["metadata"] = {"provider": err.provider}
    details: list[dict[str, Any]] = [info]
    if err.param:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": _FIELD.get(err.param, err.param), "description": err.message}]})
    if err.retry_after is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{max(1, int(round(err.retry_after + 0.499)))}s"})
    return {"error": {"code": err.status, "message": err.message, "status": status, "details": details}}


# -- the path ------------------------------------------------------------------------------------------

def split_target(rest: str) -> tuple[str, str]:
    """``gemini-2.5-flash:generateContent`` (the part after ``models/``) -> (model, action)."""
    model, sep, action = rest.rpartition(":")
    if not sep or not model or action not in ACTIONS:
        raise GatewayError(404, f"no such method: models/{rest}; supported: {', '.join(ACTIONS)}",
                           code="not_found")
    return model.removeprefix("models/"), action


# -- schemas -----------------------------------------------------------------------------------------

def schema_to_json(s: Any, depth: int = 0) -> Any:
    """A Gemini Schema object (OpenAPI subset, ``type: "OBJECT"``, ``nullable``) -> JSON Schema."""
    if not isinstance(s, dict):
        return s
    if depth > 64:
        raise bad_request("a schema is nested more than 64 levels deep", code="invalid_value")
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k == "type" and isinstance(v, str):
            out["type"] = v.lower()
        elif k == "properties" and isinstance(v, dict):
            out["properties"] = {pk: schema_to_json(pv, depth + 1) for pk, pv in v.items()}
        elif k == "items":
            out["items"] = schema_to_json(v, depth + 1)
        elif k == "anyOf" and isinstance(v, list):
            out["anyOf"] = [schema_to_json(x, depth + 1) for x in v]
        elif k in ("nullable", "propertyOrdering", "example"):
            continue
        else:
            out[k] = v
    if s.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


# -- request: Gemini -> canonical --------------------------------------------------------------------

def _kind(p: dict[str, Any], path: str) -> str:
    kinds = [k for k in _KINDS if k in p]
    other = sorted(set(p) - set(_KINDS) - _PART_META)
    if other:
        raise _err(f"{path}.{other[0]}", "parts of this kind cannot be translated by HelixAgent; supported: "
                                          + ", ".join(_KINDS), "unsupported_feature")
    if len(kinds) != 1:
        raise _err(path, "a part must hold exactly one of " + ", ".join(_KINDS))
    return kinds[0]


def _media_part(p: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    if kind == "inlineData":
        d = p["inlineData"]
        mt, data = d["mimeType"], d["data"]
        if not data:
            raise _err(path + ".inlineData.data", "must not be empty")
        if mt.startswith("image/"):
            return {"type": "image_url", "image_url": {"url": f"data:{mt};base64,{data}"}}
        if mt.startswith("audio/"):
            return {"type": "input_audio", "input_audio": {"data": data, "format": mt[6:].partition(";")[0]}}
        return {"type": "file", "file": {"file_data": f"data:{mt};base64,{data}"}}
    f = p["fileData"]
    mt = f.get("mimeType") or ""
    if mt and not mt.startswith("image/"):
        raise _err(path + ".fileData", f"file references of type {mt!r} cannot be translated; send the file "
                                       "inline (inlineData)", "unsupported_feature")
    return {"type": "image_url", "image_url": {"url": f["fileUri"]}}


def _tool_text(resp: dict[str, Any]) -> str:
    if len(resp) == 1:
        (k, v), = resp.items()
        if k in ("output", "content", "result") and isinstance(v, str):
            return v
    return orjson.dumps(resp).decode()


def _contents(contents: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
    pending: list[tuple[str, str, str]] = []   # (tool call id, its Gemini id, name) not answered yet
    for i, c in enumerate(contents):
        path = f"contents[{i}]"
        parts = c["parts"]
        if not parts:
            raise _err(path + ".parts", "must not be empty")
        if c.get("role") == "model":
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            pending = []
            for j, p in enumerate(parts):
                pp = f"{path}.parts[{j}]"
                kind = _kind(p, pp)
                if kind == "text":
                    if not p.get("thought") and p["text"]:
                        texts.append(p["text"])
                elif kind == "functionCall":
                    fc = p["functionCall"]
                    base = fc.get("id") or f"call_{i}_{j}"
                    sig = p.get("thoughtSignature")
                    tcid = base + SIG_SEP + sig if sig else base
                    args = orjson.dumps(fc.get("args") or {}).decode()
                    calls.append({"id": tcid, "type": "function", "function": {"name": fc["name"], "arguments": args}})
                    pending.append((tcid, base, fc["name"]))
                else:
                    raise _err(f"{pp}.{kind}", "only text and functionCall parts can be translated in a model "
                                               "turn", "unsupported_feature")
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else (None if calls else "")}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        user: list[dict[str, Any]] = []
        for j, p in enumerate(parts):
            pp = f"{path}.parts[{j}]"
            kind = _kind(p, pp)
            if kind == "functionResponse":
                if user:
                    raise _err(pp, "functionResponse parts must come before any other part of a turn")
                fr = p["functionResponse"]
                match = next((x for x in pending if fr.get("id") and fr["id"] in (x[0], x[1])), None) \
                    or next((x for x in pending if x[2] == fr["name"]), None)
                if match is None:
                    raise _err(pp + ".functionResponse", f"matches no functionCall of the previous model turn "
                                                         f"(name {fr['name']!r})")
                pending.remove(match)
                out.append({"role": "tool", "tool_call_id": match[0], "content": _tool_text(fr["response"])})
            elif kind == "text":
                if not p.get("thought") and p["text"]:
                    user.append({"type": "text", "text": p["text"]})
            elif kind == "functionCall":
                raise _err(pp + ".functionCall", "functionCall parts belong in model turns")
            else:
                user.append(_media_part(p, kind, pp))
        if user:
            out.append({"role": "user", "content": user[0]["text"] if len(user) == 1 and user[0]["type"] == "text"
                        else user})
        pending = []


def _system(si: dict[str, Any]) -> dict[str, Any] | None:
    texts = []
    for j, p in enumerate(si["parts"]):
        if _kind(p, f"systemInstruction.parts[{j}]") != "text":
            raise _err(f"systemInstruction.parts[{j}]", "system instructions must be text", "unsupported_feature")
        if p["text"]:
            texts.append(p["text"])
    return {"role": "system", "content": "\n".join(texts)} if texts else None


def _tools(tools: list[dict[str, Any]], native: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        for k, v in t.items():
            if k != "functionDeclarations":
                native.append({k: v})   # googleSearch, codeExecution, urlContext, ...: Gemini only
                continue
            for j, d in enumerate(v):
                p = f"tools[{i}].functionDeclarations[{j}]"
                if "parameters" in d and "parametersJsonSchema" in d:
                    raise _err(p, "set either parameters or parametersJsonSchema, not both")
                if "parametersJsonSchema" in d:
                    params = d["parametersJsonSchema"]
                elif "parameters" in d:
                    params = schema_to_json(d["parameters"])
                else:
                    params = {"type": "object", "properties": {}}
                fn: dict[str, Any] = {"name": d["name"]}
                if d.get("description"):
                    fn["description"] = d["description"]
                fn["parameters"] = params
                out.append({"type": "function", "function": fn})
    return out


def _tool_config(tc: dict[str, Any], params: dict[str, Any]) -> None:
    fcc = tc.get("functionCallingConfig")
    tools = params.get("tools")
    if not fcc or not tools:
        return
    mode = fcc.get("mode") or "AUTO"
    if mode == "NONE":
        params["tool_choice"] = "none"
    elif mode == "ANY":
        names = fcc.get("allowedFunctionNames") or []
        known = {t["function"]["name"] for t in tools}
        for k, n in enumerate(names):
            if n not in known:
                raise _err(f"toolConfig.functionCallingConfig.allowedFunctionNames[{k}]",
                           f"{n!r} is not a declared function")
        if len(names) == 1:
            params["tool_choice"] = {"type": "function", "function": {"name": names[0]}}
        else:
            if names:
                params["tools"] = [t for t in tools if t["function"]["name"] in names]
            params["tool_choice"] = "required"
    else:
        params["tool_choice"] = "auto"


def _generation(gen: dict[str, Any], params: dict[str, Any], native_gen: dict[str, Any]) -> None:
    for k, v in gen.items():
        canon = _GEN_MAPPED.get(k)
        if canon is not None:
            if k == "topK" and isinstance(v, float):
                if not v.is_integer():
                    raise _err("generationConfig.topK", "must be a whole number")
                v = int(v)
            params[canon] = v
        elif k in ("responseMimeType", "responseSchema", "responseJsonSchema"):
            continue
        elif k == "responseModalities":
            if [str(m).upper() for m in v] != ["TEXT"]:
                native_gen[k] = v
        else:
            native_gen[k] = v
    mime = gen.get("responseMimeType")
    if mime == "text/x.enum":
        native_gen["responseMimeType"] = mime
        for k in ("responseSchema", "responseJsonSchema"):
            if k in gen:
                native_gen[k] = gen[k]
        return
    if mime not in (None, "", "text/plain", "application/json"):
        native_gen["responseMimeType"] = mime
        return
    if "responseSchema" in gen and "responseJsonSchema" in gen:
        raise _err("generationConfig.responseJsonSchema", "set either responseSchema or responseJsonSchema, not both")
    schema: Any = None
    if "responseJsonSchema" in gen:
        schema = gen["responseJsonSchema"]
        if not isinstance(schema, dict):
            raise _err("generationConfig.responseJsonSchema", "must be a JSON schema object", "invalid_type")
    elif "responseSchema" in gen:
        schema = schema_to_json(gen["responseSchema"])
    if schema is not None:
        params["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    elif mime == "application/json":
        params["response_format"] = {"type": "json_object"}


def parse_generate(raw: bytes, path_model: str, known_providers: Any, stream: bool
                   ) -> tuple[ChatRequest, dict[str, Any]]:
    """A generateContent body -> (canonical request, HelixAgent fields).  ``helix["gemini"]`` holds what
    only a Gemini upstream can take (``top``, ``gen``, ``tools``); :func:`adapt` decides per provider."""
    body = check_generate(load_json_object(raw))
    return from_body(body, path_model, known_providers, stream)


def from_body(body: dict[str, Any], path_model: str, known_providers: Any, stream: bool
              ) -> tuple[ChatRequest, dict[str, Any]]:
    for k in body:
        if k not in _TOP:
            raise _err(k, "is not a known field of a GenerateContentRequest", "unknown_parameter")
    helix = {k: body[k] for k in HELIX_FIELDS if k in body}
    model, provider = split_model(path_model, helix.get("provider"), known_providers)
    messages: list[dict[str, Any]] = []
    if body.get("systemInstruction"):
        sm = _system(body["systemInstruction"])
        if sm is not None:
            messages.append(sm)
    _contents(body["contents"], messages)
    if not any(m["role"] != "system" for m in messages):
        raise _err("contents", "holds no content to answer (only empty or thought parts)")
    params: dict[str, Any] = {}
    top: dict[str, Any] = {}
    gen: dict[str, Any] = {}
    native: list[dict[str, Any]] = []
    if body.get("tools"):
        tools = _tools(body["tools"], native)
        if tools:
            params["tools"] = tools
    if body.get("toolConfig"):
        _tool_config(body["toolConfig"], params)
    if body.get("generationConfig"):
        _generation(body["generationConfig"], params, gen)
    for k in ("safetySettings", "cachedContent", "labels"):
        if k in body:
            top[k] = body[k]
    helix["gemini"] = {"top": top, "gen": gen, "tools": native}
    return ChatRequest(model=model, messages=messages, params=params, stream=stream, include_usage=stream,
                       provider=provider, endpoint="chat"), helix


def _native_names(native: dict[str, Any]) -> list[str]:
    """The Gemini-only fields of a request, as the client named them."""
    names = [*native["top"], *(f"generationConfig.{k}" for k in native["gen"])]
    names.extend(f"tools[{i}].{next(iter(t))}" for i, t in enumerate(native["tools"]))
    return names


def adapt(req: ChatRequest, native: dict[str, Any], provider: Any) -> list[str]:
    """Fit the request to the provider the router will try first (in place): Gemini-only fields are added
    for a Gemini provider; elsewhere they are dropped (hints) or refused (a 400 naming the field).
    Returns the names of the dropped fields."""
    wire = provider.cfg.wire
    p = req.params
    if wire == "gemini":
        # carried beside the canonical request, sent by a Gemini provider only (providers/gemini_mapping.py);
        # a fallback of another kind never sees them, and refuses the request if one changes its meaning
        req.extra = {**req.extra, "gemini": native}
        for name in _native_names(native):
            if name not in _DROPPABLE:
                req.only_for = ("gemini", name)
                break
        return []
    dropped: list[str] = []
    for name in _native_names(native):
        if name in _DROPPABLE:
            dropped.append(name)
            continue
        raise GatewayError(400, f"'{name}' needs a Gemini provider, and this model is routed to {provider.name!r} "
                                f"({provider.cfg.type}); route the model to a Gemini provider or remove it",
                           code="unsupported_feature", param=name, provider=provider.name)
    if wire == "openai" and provider.cfg.type != "openai_compatible" and "top_k" in p:
        p.pop("top_k")
        dropped.append("generationConfig.topK")
    if wire == "anthropic":
        for k, g in (("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty")):
            if k in p:
                p.pop(k)
                dropped.append(f"generationConfig.{g}")
    for m in req.messages:   # thought signatures mean something to Gemini only
        for tc in m.get("tool_calls") or ():
            tc["id"] = tc["id"].partition(SIG_SEP)[0]
        if m["role"] == "tool":
            m["tool_call_id"] = m["tool_call_id"].partition(SIG_SEP)[0]
    return dropped


def parse_count(raw: bytes, path_model: str, known_providers: Any) -> ChatRequest:
    body = check_count(load_json_object(raw))
    if "generateContentRequest" in body:
        if "contents" in body:
            raise _err("contents", "set either contents or generateContentRequest, not both")
        req, _ = from_body(body["generateContentRequest"], path_model, known_providers, False)
        return req
    if not body.get("contents"):
        raise _err("contents", "is required", "missing_required_parameter")
    extra = set(body) - {"contents", "model"}
    if extra:
        raise _err(sorted(extra)[0], "is not a known field of a CountTokensRequest", "unknown_parameter")
    req, _ = from_body({"contents": body["contents"]}, path_model, known_providers, False)
    return req


def _embed_text(r: dict[str, Any], path: str) -> str:
    texts = []
    for j, p in enumerate(r["content"]["parts"]):
        if _kind(p, f"{path}content.parts[{j}]") != "text":
            raise _err(f"{path}content.parts[{j}]", "only text can be embedded", "unsupported_feature")
        texts.append(p["text"])
    text = " ".join(texts)
    if not text:
        raise _err(f"{path}content", "has no text to embed")
    return text


def _embed_params(r: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "outputDimensionality" in r:
        params["dimensions"] = r["outputDimensionality"]
    return params


def parse_embed(raw: bytes, path_model: str, known_providers: Any) -> EmbeddingRequest:
    body = check_embed(load_json_object(raw))
    model, provider = split_model(path_model, body.get("provider"), known_providers)
    return EmbeddingRequest(model, [_embed_text(body, "")], _embed_params(body), provider)


def parse_batch_embed(raw: bytes, path_model: str, known_providers: Any) -> EmbeddingRequest:
    body = check_batch_embed(load_json_object(raw))
    model, provider = split_model(path_model, body.get("provider"), known_providers)
    reqs = body["requests"]
    texts = []
    for i, r in enumerate(reqs):
        m = r.get("model")
        if m is not None and m.removeprefix("models/") != path_model:
            raise _err(f"requests[{i}].model", f"must be models/{path_model}, the model in the URL")
        texts.append(_embed_text(r, f"requests[{i}]."))
    dims = {r.get("outputDimensionality") for r in reqs}
    if len(dims) > 1:
        raise _err("requests", "every request of a batch must ask for the same outputDimensionality")
    return EmbeddingRequest(model, texts, _embed_params(reqs[0]), provider)


def render_embeddings(body: dict[str, Any], batch: bool) -> dict[str, Any]:
    vecs = [{"values": d["embedding"]} for d in sorted(body.get("data") or (), key=lambda d: d.get("index", 0))]
    return {"embeddings": vecs} if batch else {"embedding": vecs[0]}


# -- response: canonical -> Gemini -------------------------------------------------------------------

def _call_part(tc: dict[str, Any]) -> dict[str, Any]:
    fn = tc.get("function") or {}
    raw = fn.get("arguments") or "{}"
    try:
        args = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        args = {"arguments": raw}
    if not isinstance(args, dict):
        args = {"value": args}
    base, _, sig = (tc.get("id") or "").partition(SIG_SEP)
    fc: dict[str, Any] = {"name": fn.get("name") or "", "args": args}
    if base:
        fc["id"] = base
    part: dict[str, Any] = {"functionCall": fc}
    if sig:
        part["thoughtSignature"] = sig
    return part


def usage_metadata(usage: Usage, raw: dict[str, Any] | None) -> dict[str, Any]:
    thoughts = int(((raw or {}).get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
    d: dict[str, Any] = {"promptTokenCount": usage.prompt_tokens,
                         "candidatesTokenCount": max(0, usage.completion_tokens - thoughts), "totalTokenCount": total}
    if thoughts:
        d["thoughtsTokenCount"] = thoughts
    if usage.cache_read_tokens:
        d["cachedContentTokenCount"] = usage.cache_read_tokens
    return d


def response_id(upstream: Any) -> str:
    return str(upstream) if upstream else "resp-" + str(time.time_ns())


def render_response(resp: ChatResponse, request_model: str = "") -> dict[str, Any]:
    b = resp.body
    cands = []
    for ch in b.get("choices") or ():
        msg = ch.get("message") or {}
        parts: list[dict[str, Any]] = []
        if msg.get("reasoning_content"):
            parts.append({"text": msg["reasoning_content"], "thought": True})
        text = text_of(msg.get("content")) or msg.get("refusal") or ""
        if text:
            parts.append({"text": text})
        parts.extend(_call_part(tc) for tc in msg.get("tool_calls") or ())
        if not parts:
            parts.append({"text": ""})
        cands.append({"content": {"role": "model", "parts": parts},
                      "finishReason": _FINISH.get(ch.get("finish_reason") or "stop", "STOP"),
                      "index": ch.get("index", 0)})
    return {"candidates": cands, "usageMetadata": usage_metadata(resp.usage, b.get("usage")),
            "modelVersion": b.get("model") or resp.model or request_model, "responseId": response_id(b.get("id"))}


class StreamRenderer:
    """Stateful: canonical chunks in, Gemini stream frames out -- ``data: <GenerateContentResponse>``
    SSE events (``alt=sse``), or the elements of one JSON array (the API's default stream form).  Text and
    thoughts go out as they come; function calls (whole objects in Gemini, fragments in the canonical
    stream) with the finishReason and usageMetadata in the last frame.  A failure ends the stream with
    an ``{"error": ...}`` frame in Google's shape."""

    __slots__ = ("model", "sse", "id", "frames", "calls", "finish", "usage", "raw_usage")

    def __init__(self, model: str, sse: bool):
        self.model = model
        self.sse = sse
        self.id = ""
        self.frames = 0
        self.calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.finish: dict[int, str] = {}
        self.usage: Usage | None = None
        self.raw_usage: dict[str, Any] | None = None

    def _frame(self, obj: dict[str, Any]) -> bytes:
        data = orjson.dumps(obj)
        self.frames += 1
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        return (b"[" if self.frames == 1 else b",\r\n") + data

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if not self.id:
            self.id = response_id(chunk.get("id"))
            self.model = chunk.get("model") or self.model
        u = chunk.get("usage")
        if u:
            self.usage = Usage.from_openai(u)
            self.raw_usage = u
        cands = []
        for ch in chunk.get("choices") or ():
            idx = ch.get("index", 0)
            d = ch.get("delta") or {}
            parts: list[dict[str, Any]] = []
            if d.get("reasoning_content"):
                parts.append({"text": d["reasoning_content"], "thought": True})
            text = d.get("content") or d.get("refusal")
            if text:
                parts.append({"text": text})
            for tc in d.get("tool_calls") or ():
                acc = self.calls.setdefault(idx, {}).setdefault(tc.get("index", 0), {
                    "id": "", "function": {"name": "", "arguments": ""}})
                fn = tc.get("function") or {}
                if tc.get("id"):
                    acc["id"] = tc["id"]
                acc["function"]["name"] += fn.get("name") or ""
                acc["function"]["arguments"] += fn.get("arguments") or ""
            if ch.get("finish_reason"):
                self.finish[idx] = ch["finish_reason"]
            if parts:
                cands.append({"content": {"role": "model", "parts": parts}, "index": idx})
        if not cands:
            return b""
        return self._frame({"candidates": cands, "modelVersion": self.model, "responseId": self.id})

    def end(self, error: GatewayError | None = None) -> bytes:
        if error is not None:
            out = self._frame(google_body(error))
        else:
            cands = []
            for idx in sorted(set(self.finish) | set(self.calls) or {0}):
                cand: dict[str, Any] = {"finishReason": _FINISH.get(self.finish.get(idx) or "stop", "STOP"),
                                        "index": idx}
                calls = self.calls.get(idx)
                parts = [_call_part(calls[k]) for k in sorted(calls)] if calls else [{"text": ""}]
                cand["content"] = {"role": "model", "parts": parts}
                cands.append(cand)
            out = self._frame({"candidates": cands,
                               "usageMetadata": usage_metadata(self.usage or Usage(), self.raw_usage),
                               "modelVersion": self.model, "responseId": self.id or response_id(None)})
        return out if self.sse else out + b"]"


# -- models ------------------------------------------------------------------------------------------

def model_object(mid: str, provider: Any) -> dict[str, Any]:
    from ..providers.catalogue import context_window, max_output_tokens
    embed = "embed" in mid
    methods = ["embedContent", "batchEmbedContents"] if embed else [
        "generateContent", "streamGenerateContent", "countTokens"]
    d: dict[str, Any] = {"name": f"models/{mid}", "version": "", "displayName": mid,
                         "description": f"served by HelixAgent provider {provider.name} ({provider.cfg.type})",
                         "supportedGenerationMethods": methods}
    cw = context_window(provider.cfg, mid.rpartition("/")[2])
    if cw:
        d["inputTokenLimit"] = cw
    mo = max_output_tokens(provider.cfg, mid.rpartition("/")[2])
    if mo:
        d["outputTokenLimit"] = mo
    return d
