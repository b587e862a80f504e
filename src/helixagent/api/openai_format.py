"""The OpenAI client format: parse requests into the canonical model, render canonical answers back."""
from __future__ import annotations

from typing import Any

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest
from ..errors import GatewayError, bad_request

# HelixAgent's own request fields; removed before anything goes upstream.
HELIX_FIELDS = ("provider", "cache")
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))


def _typecheck(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
        raise bad_request(f"'{name}' must be {what}", param=name, code="invalid_type")


def _number_range(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{name}' must be a number", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo:g} and {hi:g}, got {v}", param=name, code="invalid_value")


def _positive_int(body: dict[str, Any], name: str) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad_request(f"'{name}' must be a positive integer", param=name, code="invalid_value")


def load_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def split_model(model: Any, provider: Any, known: Any) -> tuple[str, str | None]:
    """Resolve ``provider/model`` names and the ``provider`` field.  ``known`` holds provider names."""
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model", code="invalid_type")
    if provider is not None and not isinstance(provider, str):
        raise bad_request("'provider' must be a string", param="provider", code="invalid_type")
    model = model or ""
    if provider is None and "/" in model:
        head, _, tail = model.partition("/")
        if head in known:
            return tail, head
    return model, provider


def _common(body: dict[str, Any]) -> None:
    _typecheck(body, "stream", (bool,), "a boolean")
    _number_range(body, "temperature", 0, 2)
    _number_range(body, "top_p", 0, 1)
    _number_range(body, "presence_penalty", -2, 2)
    _number_range(body, "frequency_penalty", -2, 2)
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options", code="invalid_type")


def _open_body(raw: bytes, known_providers: Any) -> tuple[dict[str, Any], dict[str, Any], str, str | None]:
    """The JSON body (HelixAgent fields and ``model`` taken out), the HelixAgent fields, model, provider."""
    body = load_json_object(raw)
    helix = {k: body.pop(k) for k in HELIX_FIELDS if k in body}
    if "model" not in body and "provider" not in helix:
        raise bad_request("'model' is required", param="model", code="missing_required_parameter")
    model, provider = split_model(body.pop("model", None), helix.get("provider"), known_providers)
    return body, helix, model, provider


def parse_chat(raw: bytes, known_providers: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Parse a /v1/chat/completions body.  Returns the canonical request and the HelixAgent fields."""
    body, helix, model, provider = _open_body(raw, known_providers)
    messages = body.pop("messages", None)
    if messages is None:
        raise bad_request("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"'messages[{i}].role' must be one of system, developer, user, assistant, tool; "
                              f"got {role!r}", param=f"messages[{i}].role", code="invalid_value")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise bad_request(f"'messages[{i}].content' must be a string or an array of content parts",
                              param=f"messages[{i}].content", code="invalid_type")
        if c is None and role in ("user", "system", "developer") :
            raise bad_request(f"'messages[{i}].content' is required for role {role}",
                              param=f"messages[{i}].content", code="missing_required_parameter")
    _common(body)
    stream = bool(body.pop("stream", False))
    so = body.get("stream_options") or {}
    include_usage = bool(so.get("include_usage")) if stream else False
    if not stream:
        body.pop("stream_options", None)
    return ChatRequest(model=model, messages=messages, params=body, stream=stream, include_usage=include_usage,
                       provider=provider, endpoint="chat"), helix


def parse_completion(raw: bytes, known_providers: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Parse a legacy /v1/completions body into a canonical request (``endpoint="completion"``).

    ``prompt`` keeps the original prompt for upstreams that speak the legacy API natively;
    ``messages`` carries it as one user turn for every other provider."""
    body, helix, model, provider = _open_body(raw, known_providers)
    prompt = body.pop("prompt", None)
    if prompt is None:
        raise bad_request("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            if not all(isinstance(p, str) for p in prompt):
                raise bad_request("'prompt' must be a string or an array of strings (token arrays are "
                                  "only accepted as a single string here)", param="prompt", code="invalid_type")
            raise bad_request("only one prompt per request is supported; send one request per prompt",
                              param="prompt", code="unsupported_feature")
        text = prompt[0]
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise bad_request("'prompt' must be a string", param="prompt", code="invalid_type")
    _common(body)
    stream = bool(body.pop("stream", False))
    so = body.get("stream_options") or {}
    include_usage = bool(so.get("include_usage")) if stream else False
    if not stream:
        body.pop("stream_options", None)
    messages = [{"role": "user", "content": text}]
    return ChatRequest(model=model, messages=messages, params=body, stream=stream, include_usage=include_usage,
                       provider=provider, endpoint="completion", prompt=prompt), helix


MAX_EMBEDDING_INPUTS = 2048       # OpenAI's documented limit per request
MAX_EMBEDDING_DIMENSIONS = 16384  # larger than any embedding model offers; bounds a mock's allocation


def _token_array(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x)


def parse_embeddings(raw: bytes, known_providers: Any) -> EmbeddingRequest:
    body, _helix, model, provider = _open_body(raw, known_providers)
    inp = body.pop("input", None)
    if inp is None:
        raise bad_request("'input' is required", param="input", code="missing_required_parameter")
    if isinstance(inp, list) and not inp:
        raise bad_request("'input' must not be an empty array", param="input", code="invalid_value")
    if isinstance(inp, str):
        items: list[Any] = [inp]
    elif isinstance(inp, list) and all(isinstance(x, str) for x in inp):
        items = inp
    elif _token_array(inp):
        items = [inp]
    elif isinstance(inp, list) and all(_token_array(x) for x in inp):
        items = inp
    else:
        raise bad_request("'input' must be a string, an array of strings, an array of token ids (non-negative "
                          "integers), or an array of non-empty token arrays", param="input", code="invalid_type")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS} per request",
                          param="input", code="invalid_value")
    for i, x in enumerate(items):
        if isinstance(x, str) and not x:
            raise bad_request(f"'input[{i}]' is an empty string; embeddings need non-empty input",
                              param="input", code="invalid_value")
    _positive_int(body, "dimensions")
    dims = body.get("dimensions")
    if dims is not None and dims > MAX_EMBEDDING_DIMENSIONS:
        raise bad_request(f"'dimensions' must be at most {MAX_EMBEDDING_DIMENSIONS}", param="dimensions",
                          code="invalid_value")
    ef = body.get("encoding_format")
    if ef is not None and ef not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format",
                          code="invalid_value")
    _typecheck(body, "user", (str,), "a string")
    return EmbeddingRequest(model=model, input=items, params=body, provider=provider)


# -- rendering ----------------------------------------------------------------------------------------

def render_chat(resp: ChatResponse) -> dict[str, Any]:
    body = resp.body
    if resp.provider:
        body["provider"] = resp.provider
    return body


def render_completion(resp: ChatResponse) -> dict[str, Any]:
    """canonical chat.completion -> legacy text_completion."""
    b = resp.body
    if b.get("object") == "text_completion":
        out = dict(b)
    else:
        out = {"id": b.get("id", ""), "object": "text_completion", "created": b.get("created"),
               "model": b.get("model", resp.model),
               "choices": [{"text": (c.get("message") or {}).get("content") or "", "index": c.get("index", 0),
                            "logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason")}
                           for c in b.get("choices") or ()],
               "usage": resp.usage.to_openai()}
        if b.get("system_fingerprint"):
            out["system_fingerprint"] = b["system_fingerprint"]
    if resp.provider:
        out["provider"] = resp.provider
    return out


def completion_chunk(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """canonical chunk -> legacy text_completion stream chunk (None to skip)."""
    choices = []
    for c in chunk.get("choices") or ():
        d = c.get("delta") or {}
        text = d.get("content") or ""
        fr = c.get("finish_reason")
        if not text and fr is None:
            continue
        choices.append({"text": text, "index": c.get("index", 0), "logprobs": c.get("logprobs"),
                        "finish_reason": fr})
    usage = chunk.get("usage")
    if not choices and not usage:
        return None
    out = {"id": chunk.get("id", ""), "object": "text_completion", "created": chunk.get("created"),
           "model": chunk.get("model", ""), "choices": choices}
    if usage:
        out["usage"] = usage
    return out


def error_body(err: GatewayError) -> bytes:
    return orjson.dumps(err.openai_body())
