"""Gemini wire format (the mapping; the provider is in ``gemini.py``): the Gemini API ``generateContent`` /
``streamGenerateContent?alt=sse`` /
``embedContent`` / ``batchEmbedContents`` (``{base_url}/v1beta/models/{model}:{method}``, key in the
``x-goog-api-key`` header; a base_url already ending in ``/v1beta`` or ``/v1`` is used as is).

Mapping decisions (also in docs/providers.md):

* system/developer messages -> ``systemInstruction`` (one part per message); user -> ``user``,
  assistant -> ``model``; consecutive turns of one role are merged (Gemini wants alternating turns);
  tool messages become ``functionResponse`` parts ``{"name", "id", "response": {"content": <text>}}``,
  the name found from the earlier assistant tool call with that id.
* images: ``data:`` URLs -> ``inlineData``; Gemini Files API URIs and ``gs://`` -> ``fileData``; other
  http(s) URLs are a 400 (the Gemini API does not fetch arbitrary URLs: send the image inline).
* tool calls: ``functionCall`` parts <-> ``tool_calls`` (arguments as a JSON string).  Gemini's
  ``thoughtSignature`` (needed to continue a thinking model's tool use) rides inside the tool call id
  (``<id>~ts~<signature>``) so it comes back with the client's next request through any OpenAI client.
* ``tool_choice`` auto/none/required/{function} -> functionCallingConfig AUTO/NONE/ANY/ANY+allowed name;
  ``parallel_tool_calls`` has no Gemini switch and is ignored.
* generationConfig: temperature, top_p, top_k, max_tokens, stop (at most 5), n -> candidateCount,
  presence/frequency penalties, seed, response_format json_object/json_schema ->
  responseMimeType/responseSchema, reasoning_effort -> thinkingConfig.thinkingBudget (Google's own
  OpenAI-compatibility mapping: none 0, low 1024, medium 8192, high 24576).
* ``logprobs``/``top_logprobs``, ``logit_bias``, audio output and predicted outputs are a 400.  ``user``
  and OpenAI bookkeeping fields (store, metadata, service_tier) are dropped.  Unknown fields (e.g.
  ``safetySettings``, ``cachedContent``) pass through to the top level of the Gemini request.
* a prompt blocked by safety filters (``promptFeedback.blockReason``, no candidates) is a 400 with code
  ``content_filter`` -- the request, not the upstream, is at fault and retrying elsewhere will not help;
  output stopped by a filter (finishReason SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII,
  IMAGE_SAFETY, LANGUAGE) is ``finish_reason: content_filter``.
* usage: prompt = promptTokenCount + toolUsePromptTokenCount, completion = candidatesTokenCount +
  thoughtsTokenCount (OpenAI counts reasoning as completion), cached = cachedContentTokenCount.
"""
from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from ..canonical import ChatRequest, Usage, new_chunk, usage_chunk
from ..errors import GatewayError, bad_request
from .base import image_url_of, split_image_data_url
from .checks import check_chat

SIG_SEP = "~ts~"
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
           "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
           "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter", "OTHER": "stop",
           "MALFORMED_FUNCTION_CALL": "stop", "UNEXPECTED_TOOL_CALL": "stop", "FINISH_REASON_UNSPECIFIED": "stop"}
_FINISH_BACK = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY", "tool_calls": "STOP"}
_EFFORT = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}
_EFFORT_BACK = {0: "none", 1024: "low", 8192: "medium", 24576: "high"}
_DROP = frozenset(("store", "service_tier", "stream_options", "metadata", "user", "stream", "parallel_tool_calls"))
_GEN = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "n": "candidateCount",
        "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty", "seed": "seed"}
_GEN_BACK = {v: k for k, v in _GEN.items()}
# The OpenAPI-schema subset Gemini's Schema object accepts.
_SCHEMA_KEYS = frozenset(("type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
                          "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
                          "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum",
                          "maximum"))
_GOOGLE_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
                  "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500,
                  "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "ABORTED": 409, "CANCELLED": 499}


def _uns(feature: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, f"the Gemini API does not support {feature}", code="unsupported_feature", param=param)


# -- schemas -----------------------------------------------------------------------------------------
_MAX_SCHEMA_DEPTH = 64


def sanitize_schema(s: Any, where: str = "parameters", unsupported: Any = _uns, depth: int = 0) -> Any:
    """JSON Schema -> Gemini Schema: keep the supported keywords, turn ``type: [T, "null"]`` into
    ``type: T, nullable: true`` and ``const`` into a one-value enum; ``$ref`` is a 400, and so is a
    schema nested deeper than 64 levels."""
    if not isinstance(s, dict):
        return s
    if depth > _MAX_SCHEMA_DEPTH:
        raise bad_request(f"'{where.split('.')[0]}' is nested more than {_MAX_SCHEMA_DEPTH} levels deep",
                          param=where.split(".")[0], code="invalid_value")
    d = depth + 1
    if "$ref" in s:
        raise unsupported("JSON schemas with $ref (inline the definitions)", where)
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k == "type" and isinstance(v, list):
            types = [t for t in v if t != "null"]
            if len(types) != 1:
                raise unsupported("schemas whose type is a list of several non-null types", where)
            out["type"] = types[0]
            if "null" in v:
                out["nullable"] = True
        elif k == "const":
            out["enum"] = [v]
        elif k == "properties" and isinstance(v, dict):
            out["properties"] = {pk: sanitize_schema(pv, f"{where}.{pk}", unsupported, d) for pk, pv in v.items()}
        elif k == "items":
            out["items"] = sanitize_schema(v, where + ".items", unsupported, d)
        elif k == "anyOf" and isinstance(v, list):
            out["anyOf"] = [sanitize_schema(x, where + ".anyOf", unsupported, d) for x in v]
        elif k in _SCHEMA_KEYS:
            out[k] = v
    return out


# -- request: canonical -> Gemini ----------------------------------------------------------------------
def _split_id(tcid: str) -> tuple[str, str | None]:
    base, sep, sig = tcid.partition(SIG_SEP)
    return base, (sig if sep else None)


def _image_part(part: dict[str, Any], where: str, unsupported: Any) -> dict[str, Any]:
    url = image_url_of(part, where)
    if url.startswith("data:"):
        media, data = split_image_data_url(url, where)
        return {"inlineData": {"mimeType": media, "data": data}}
    if url.startswith("gs://") or (url.startswith("https://generativelanguage.googleapis.com/") and "/files/" in url):
        import mimetypes
        mt = mimetypes.guess_type(url)[0] or "image/jpeg"
        return {"fileData": {"mimeType": mt, "fileUri": url}}
    raise unsupported("image URLs other than Gemini Files API URIs (send the image inline as a data: URL)", where)


def _parts(content: Any, where: str, unsupported: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts", param=where, code="invalid_type")
    out: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        w = f"{where}[{j}]"
        if isinstance(p, str):
            if p:
                out.append({"text": p})
            continue
        if not isinstance(p, dict):
            raise bad_request(f"'{w}' must be an object", param=w, code="invalid_type")
        t = p.get("type")
        if t == "text":
            if p.get("text"):
                out.append({"text": p["text"]})
        elif t == "refusal":
            if p.get("refusal"):
                out.append({"text": p["refusal"]})
        elif t == "image_url":
            out.append(_image_part(p, w, unsupported))
        elif t == "file":
            f = p.get("file") or {}
            data = f.get("file_data") if isinstance(f, dict) else None
            if not isinstance(data, str) or not data.startswith("data:"):
                raise unsupported("file parts other than inline base64 data", w)
            head, _, payload = data[5:].partition(",")
            out.append({"inlineData": {"mimeType": head.partition(";")[0], "data": payload}})
        elif t == "input_audio":
            a = p.get("input_audio") or {}
            fmt = a.get("format") or "wav"
            out.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": a.get("data", "")}})
        else:
            raise bad_request(f"'{w}.type' {t!r} is not a known content part type", param=w, code="invalid_value")
    return out


def _args(s: Any, where: str) -> dict[str, Any]:
    if isinstance(s, dict):
        return s
    if not s:
        return {}
    try:
        v = orjson.loads(s)
    except (orjson.JSONDecodeError, TypeError):
        raise bad_request(f"'{where}' is not valid JSON", param=where, code="invalid_value") from None
    if not isinstance(v, dict):
        raise bad_request(f"'{where}' must encode a JSON object", param=where, code="invalid_value")
    return v


def canonical_to_gemini_request(req: ChatRequest, unsupported: Any = None) -> dict[str, Any]:
    check_chat(req)  # the types of every field read below (a 400 naming the field, never a crash)
    uns = unsupported or _uns
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}   # tool call id -> function name

    def push(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        c = m.get("content")
        if role in ("system", "developer"):
            system.extend(_parts(c, where + ".content", uns))
        elif role == "user":
            push("user", _parts(c, where + ".content", uns))
        elif role == "assistant":
            parts = _parts(c, where + ".content", uns)
            for n, tc in enumerate(m.get("tool_calls") or ()):
                w = f"{where}.tool_calls[{n}]"
                if not isinstance(tc, dict) or tc.get("type", "function") != "function":
                    raise uns("tool calls other than function calls", w)
                fn = tc.get("function") or {}
                if not fn.get("name"):
                    raise bad_request(f"'{w}.function.name' is required", param=w, code="missing_required_parameter")
                tcid = tc.get("id") or ""
                base, sig = _split_id(tcid)
                names[tcid] = names[base] = fn["name"]
                fc: dict[str, Any] = {"name": fn["name"], "args": _args(fn.get("arguments"), w + ".function.arguments")}
                if base:
                    fc["id"] = base
                part: dict[str, Any] = {"functionCall": fc}
                if sig:
                    part["thoughtSignature"] = sig
                parts.append(part)
            if m.get("function_call"):
                raise uns("the legacy function_call message field (use tool_calls)", where)
            push("model", parts)
        elif role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid:
                raise bad_request(f"'{where}.tool_call_id' is required for tool messages", param=where,
                                  code="missing_required_parameter")
            base, _ = _split_id(tcid)
            name = names.get(tcid) or names.get(base) or m.get("name")
            if not name:
                raise bad_request(f"'{where}.tool_call_id' {tcid!r} matches no earlier assistant tool call "
                                  "(Gemini needs the function name)", param=where, code="invalid_value")
            text = c if isinstance(c, str) else "".join(
                p.get("text", "") for p in c or () if isinstance(p, dict) and p.get("type") == "text")
            fr: dict[str, Any] = {"name": name, "response": {"content": text}}
            if base:
                fr["id"] = base
            push("user", [{"functionResponse": fr}])
        elif role == "function":
            raise uns("the legacy 'function' role (use tool messages)", where + ".role")
        else:
            raise bad_request(f"'{where}.role' {role!r} is not a chat role", param=where, code="invalid_value")

    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    gen: dict[str, Any] = {}
    p = req.params
    ext = req.extra.get("gemini")
    if ext:  # the Gemini ingress's own fields (api/gemini_format.py): top level, generationConfig, native tools
        p = {**p, **ext["top"]}
        if ext["gen"]:
            p["generationConfig"] = {**(p.get("generationConfig") or {}), **ext["gen"]}
        if ext["tools"]:
            p["tools"] = [*(p.get("tools") or ()), *ext["tools"]]
    mt = req.max_tokens
    if mt is not None:
        gen["maxOutputTokens"] = mt
    for k, v in p.items():
        if v is None or k in _DROP or k in ("max_tokens", "max_completion_tokens"):
            continue
        g = _GEN.get(k)
        if g is not None:
            gen[g] = v
        elif k == "stop":
            stops = [v] if isinstance(v, str) else list(v)
            if len(stops) > 5:
                raise uns("more than 5 stop sequences", "stop")
            gen["stopSequences"] = stops
        elif k == "logprobs":
            if v:
                raise uns("logprobs", "logprobs")
        elif k == "top_logprobs":
            raise uns("logprobs", "top_logprobs")
        elif k == "logit_bias":
            if v:
                raise uns("logit_bias", k)
        elif k == "response_format":
            t = v.get("type") if isinstance(v, dict) else None
            if t == "json_object":
                gen["responseMimeType"] = "application/json"
            elif t == "json_schema":
                js = v.get("json_schema") or {}
                gen["responseMimeType"] = "application/json"
                if js.get("schema") is not None:
                    gen["responseSchema"] = sanitize_schema(js["schema"], "response_format.json_schema.schema", uns)
            elif t not in (None, "text"):
                raise uns(f"response_format {t}", "response_format")
        elif k == "reasoning_effort":
            if v not in _EFFORT:
                raise uns(f"reasoning_effort {v!r} (Gemini's efforts are none, minimal, low, medium, high)", k)
            gen.setdefault("thinkingConfig", {})["thinkingBudget"] = _EFFORT[v]
        elif k in ("audio", "prediction", "web_search_options", "functions", "function_call"):
            raise uns(k.replace("_", " "), k)
        elif k == "modalities":
            if v and list(v) != ["text"]:
                raise uns("output modalities other than text", k)
        elif k == "tools":
            if v:
                body["tools"] = _tools_to_gemini(v, uns)
        elif k == "tool_choice":
            tc = _tool_choice_to_gemini(v)
            if tc is not None:
                body["toolConfig"] = tc
        elif k == "generationConfig" and isinstance(v, dict):
            gen.update(v)
        else:
            body[k] = v  # Gemini-native fields (safetySettings, cachedContent, ...) pass through
    if gen:
        body["generationConfig"] = gen
    return body


def _tools_to_gemini(tools: Any, uns: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", param="tools", code="invalid_type")
    decls = []
    native = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"'tools[{i}]' must be an object", param=f"tools[{i}]", code="invalid_type")
        if t.get("type") == "function":
            fn = t.get("function") or {}
            if not fn.get("name"):
                raise bad_request(f"'tools[{i}].function.name' is required", param=f"tools[{i}]",
                                  code="missing_required_parameter")
            d: dict[str, Any] = {"name": fn["name"]}
            if fn.get("description") is not None:
                d["description"] = fn["description"]
            params = fn.get("parameters")
            # Gemini rejects an OBJECT schema without properties: a no-argument function has none
            if isinstance(params, dict) and (params.get("properties") or params.get("type") not in ("object", None)):
                d["parameters"] = sanitize_schema(params, f"tools[{i}].function.parameters", uns)
            decls.append(d)
        elif "type" not in t:
            native.append(t)  # a Gemini-native tool ({googleSearch: {}}, {codeExecution: {}}, ...)
        else:
            raise uns(f"{t.get('type')} tools", f"tools[{i}]")
    out: list[dict[str, Any]] = []
    if decls:
        out.append({"functionDeclarations": decls})
    out.extend(native)
    return out


def _tool_choice_to_gemini(tc: Any) -> dict[str, Any] | None:
    if tc == "auto":
        return {"functionCallingConfig": {"mode": "AUTO"}}
    if tc == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}
    if tc == "required":
        return {"functionCallingConfig": {"mode": "ANY"}}
    if isinstance(tc, dict) and tc.get("type") == "function":
        name = (tc.get("function") or {}).get("name")
        if not name:
            raise bad_request("'tool_choice.function.name' is required", param="tool_choice",
                              code="missing_required_parameter")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    raise bad_request("'tool_choice' must be auto, none, required or {type: function, function: {name}}",
                      param="tool_choice", code="invalid_value")


# -- request: Gemini -> canonical (the reverse mapper; used by round-trip tests) -------------------------
def _part_to_canonical(p: dict[str, Any]) -> dict[str, Any]:
    if "text" in p:
        return {"type": "text", "text": p["text"]}
    if "inlineData" in p:
        d = p["inlineData"]
        mt = d.get("mimeType", "")
        url = f"data:{mt};base64,{d.get('data', '')}"
        if mt.startswith("image/"):
            return {"type": "image_url", "image_url": {"url": url}}
        if mt.startswith("audio/"):
            return {"type": "input_audio", "input_audio": {"data": d.get("data", ""), "format": mt[6:]}}
        return {"type": "file", "file": {"file_data": url}}
    if "fileData" in p:
        return {"type": "image_url", "image_url": {"url": p["fileData"].get("fileUri", "")}}
    raise bad_request(f"Gemini part {sorted(p)} cannot be translated", code="unsupported_feature")


def _simplify(parts: list[dict[str, Any]]) -> Any:
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def gemini_request_to_canonical(body: dict[str, Any], model: str, stream: bool = False) -> ChatRequest:
    messages: list[dict[str, Any]] = []
    si = body.get("systemInstruction")
    if si:
        for p in si.get("parts") or ():
            messages.append({"role": "system", "content": p.get("text", "")})
    for c in body.get("contents") or ():
        role = c.get("role", "user")
        if role == "model":
            msg: dict[str, Any] = {"role": "assistant"}
            parts, calls = [], []
            for p in c.get("parts") or ():
                if "functionCall" in p:
                    fc = p["functionCall"]
                    tcid = fc.get("id") or ""
                    if p.get("thoughtSignature"):
                        tcid += SIG_SEP + p["thoughtSignature"]
                    calls.append({"id": tcid, "type": "function",
                                  "function": {"name": fc.get("name", ""),
                                               "arguments": orjson.dumps(fc.get("args") or {}).decode()}})
                else:
                    parts.append(_part_to_canonical(p))
            msg["content"] = _simplify(parts) if parts else None
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        else:
            parts = []
            for p in c.get("parts") or ():
                if "functionResponse" in p:
                    if parts:
                        messages.append({"role": "user", "content": _simplify(parts)})
                        parts = []
                    fr = p["functionResponse"]
                    resp = fr.get("response") or {}
                    content = resp["content"] if set(resp) == {"content"} and isinstance(resp["content"], str) \
                        else orjson.dumps(resp).decode()
                    messages.append({"role": "tool", "tool_call_id": fr.get("id") or fr.get("name", ""),
                                     "content": content})
                else:
                    parts.append(_part_to_canonical(p))
            if parts:
                messages.append({"role": "user", "content": _simplify(parts)})
    params: dict[str, Any] = {}
    gen = dict(body.get("generationConfig") or {})
    if "maxOutputTokens" in gen:
        params["max_tokens"] = gen.pop("maxOutputTokens")
    for g, k in _GEN_BACK.items():
        if g in gen:
            params[k] = gen.pop(g)
    if "stopSequences" in gen:
        params["stop"] = gen.pop("stopSequences")
    if "responseMimeType" in gen:
        mt = gen.pop("responseMimeType")
        if "responseSchema" in gen:
            params["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "response", "schema": gen.pop("responseSchema")}}
        elif mt == "application/json":
            params["response_format"] = {"type": "json_object"}
    tcfg = gen.get("thinkingConfig")
    if isinstance(tcfg, dict) and set(tcfg) == {"thinkingBudget"} and tcfg["thinkingBudget"] in _EFFORT_BACK:
        params["reasoning_effort"] = _EFFORT_BACK[gen.pop("thinkingConfig")["thinkingBudget"]]
    if gen:
        params["generationConfig"] = gen
    tools = []
    for t in body.get("tools") or ():
        if "functionDeclarations" in t:
            for d in t["functionDeclarations"]:
                fn = {"name": d.get("name", "")}
                if "description" in d:
                    fn["description"] = d["description"]
                fn["parameters"] = d.get("parameters") or {"type": "object", "properties": {}}
                tools.append({"type": "function", "function": fn})
        else:
            tools.append(t)
    if tools:
        params["tools"] = tools
    fcc = (body.get("toolConfig") or {}).get("functionCallingConfig")
    if fcc:
        mode = fcc.get("mode")
        if mode == "ANY" and fcc.get("allowedFunctionNames"):
            params["tool_choice"] = {"type": "function", "function": {"name": fcc["allowedFunctionNames"][0]}}
        else:
            params["tool_choice"] = {"AUTO": "auto", "NONE": "none", "ANY": "required"}.get(mode, "auto")
    for k, v in body.items():
        if k not in ("contents", "systemInstruction", "generationConfig", "tools", "toolConfig"):
            params[k] = v
    return ChatRequest(model=model, messages=messages, params=params, stream=stream, include_usage=stream)


# -- responses ---------------------------------------------------------------------------------------
def usage_from_gemini(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    p = int(u.get("promptTokenCount") or 0) + int(u.get("toolUsePromptTokenCount") or 0)
    thoughts = int(u.get("thoughtsTokenCount") or 0)
    c = int(u.get("candidatesTokenCount") or 0) + thoughts
    return Usage(p, c, p + c, int(u.get("cachedContentTokenCount") or 0))


def _usage_dict(u: Usage, raw: dict[str, Any] | None) -> dict[str, Any]:
    d = u.to_openai()
    thoughts = int((raw or {}).get("thoughtsTokenCount") or 0)
    if thoughts:
        d["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return d


def finish_from_gemini(reason: str | None, had_calls: bool) -> str | None:
    if reason is None:
        return None
    f = _FINISH.get(reason, "stop")
    return "tool_calls" if had_calls and f == "stop" else f


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


def _tool_call(p: dict[str, Any]) -> dict[str, Any]:
    fc = p["functionCall"]
    tcid = fc.get("id") or _new_id()
    if p.get("thoughtSignature"):
        tcid += SIG_SEP + p["thoughtSignature"]
    return {"id": tcid, "type": "function",
            "function": {"name": fc.get("name", ""), "arguments": orjson.dumps(fc.get("args") or {}).decode()}}


def blocked_error(feedback: dict[str, Any], provider: str | None = None) -> GatewayError:
    reason = feedback.get("blockReason")
    msg = feedback.get("blockReasonMessage") or ""
    return GatewayError(400, f"the prompt was blocked by the provider's safety filters ({reason})"
                        + (f": {msg}" if msg else ""), type="invalid_request_error", code="content_filter",
                        provider=provider, kind="content_filter")


def gemini_response_to_canonical(resp: dict[str, Any], model: str, provider: str | None = None,
                                 created: int | None = None) -> tuple[dict[str, Any], Usage]:
    cands = resp.get("candidates") or []
    fb = resp.get("promptFeedback") or {}
    if not cands and fb.get("blockReason"):
        raise blocked_error(fb, provider)
    choices = []
    for i, cand in enumerate(cands):
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for p in (cand.get("content") or {}).get("parts") or ():
            if "functionCall" in p:
                calls.append(_tool_call(p))
            elif "text" in p:
                (thoughts if p.get("thought") else texts).append(p["text"])
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
        if calls:
            msg["tool_calls"] = calls
        if thoughts:
            msg["reasoning_content"] = "".join(thoughts)
        choices.append({"index": cand.get("index", i), "message": msg, "logprobs": None,
                        "finish_reason": finish_from_gemini(cand.get("finishReason") or "STOP", bool(calls))})
    if not choices:
        choices.append({"index": 0, "message": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None, "finish_reason": "stop"})
    usage = usage_from_gemini(resp.get("usageMetadata"))
    body = {"id": resp.get("responseId") or "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": created or int(time.time()), "model": resp.get("modelVersion") or model,
            "choices": choices, "usage": _usage_dict(usage, resp.get("usageMetadata"))}
    return body, usage


class GeminiStreamDecoder:
    """streamGenerateContent SSE payloads -> canonical chunks.  ``finished`` turns true when every
    candidate seen has a finishReason; :meth:`final` gives the usage chunk."""

    __slots__ = ("id", "model", "created", "seen", "ntools", "finished", "usage_raw", "provider", "_open")

    def __init__(self, model: str, provider: str | None = None):
        self.id = ""
        self.model = model
        self.created = int(time.time())
        self.seen: set[int] = set()
        self.ntools: dict[int, int] = {}
        self.finished = False
        self.usage_raw: dict[str, Any] | None = None
        self.provider = provider
        self._open: set[int] = set()

    def feed(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        if "error" in ev and "candidates" not in ev:
            raise StreamErrorEvent(ev["error"])
        if not self.id:
            self.id = ev.get("responseId") or "chatcmpl-" + secrets.token_hex(12)
            self.model = ev.get("modelVersion") or self.model
        if ev.get("usageMetadata"):
            self.usage_raw = ev["usageMetadata"]
        cands = ev.get("candidates") or []
        fb = ev.get("promptFeedback") or {}
        if not cands and fb.get("blockReason"):
            raise blocked_error(fb, self.provider)
        out: list[dict[str, Any]] = []
        for i, cand in enumerate(cands):
            idx = cand.get("index", i)
            if idx not in self.seen:
                self.seen.add(idx)
                self._open.add(idx)
                out.append(new_chunk(self.id, self.model, self.created, {"role": "assistant", "content": ""},
                                     index=idx))
            for p in (cand.get("content") or {}).get("parts") or ():
                if "functionCall" in p:
                    ti = self.ntools.get(idx, 0)
                    self.ntools[idx] = ti + 1
                    tc = _tool_call(p)
                    tc["index"] = ti
                    out.append(new_chunk(self.id, self.model, self.created, {"tool_calls": [tc]}, index=idx))
                elif p.get("text"):
                    key = "reasoning_content" if p.get("thought") else "content"
                    out.append(new_chunk(self.id, self.model, self.created, {key: p["text"]}, index=idx))
            fr = cand.get("finishReason")
            if fr:
                out.append(new_chunk(self.id, self.model, self.created, {},
                                     finish_from_gemini(fr, bool(self.ntools.get(idx))), index=idx))
                self._open.discard(idx)
        if self.seen and not self._open:
            self.finished = True
        return out

    def final(self) -> dict[str, Any]:
        u = usage_from_gemini(self.usage_raw)
        c = usage_chunk(self.id, self.model, self.created, u)
        c["usage"] = _usage_dict(u, self.usage_raw)
        return c


class StreamErrorEvent(Exception):
    def __init__(self, err: Any):
        err = err if isinstance(err, dict) else {"message": str(err)}
        super().__init__(err.get("message"))
        self.err = err


def google_error(data: bytes | dict[str, Any]) -> tuple[str | None, str | None, str | None, float | None]:
    """(message, status, reason, retry delay seconds) from a Google error body."""
    try:
        body = orjson.loads(data) if isinstance(data, (bytes, bytearray)) else data
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace").strip() if isinstance(data, (bytes, bytearray)) else ""
        return text[:500] or None, None, None, None
    if isinstance(body, list) and body:
        body = body[0]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, None, None, None
    reason = None
    delay = None
    for d in err.get("details") or ():
        if not isinstance(d, dict):
            continue
        reason = reason or d.get("reason")
        rd = d.get("retryDelay")
        if isinstance(rd, str) and rd.endswith("s"):
            try:
                delay = float(rd[:-1])
            except ValueError:
                pass
    return (str(err.get("message") or "")[:2000] or None), err.get("status"), reason, delay


# -- provider ------------------------------------------------------------------------------------------
