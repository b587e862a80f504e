"""The OpenAI client format: parse requests into the canonical model, render canonical answers back."""
from __future__ import annotations

from typing import Any, Callable

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest
from ..errors import GatewayError, bad_request
from .schemas import openai as schema

# HelixAgent's own request fields; removed before anything goes upstream.
HELIX_FIELDS = ("provider", "cache")


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


def _open_body(raw: bytes, known_providers: Any, check: Callable[[Any], Any]
               ) -> tuple[dict[str, Any], dict[str, Any], str, str | None]:
    """The body checked against its declared schema (``schemas/openai.py``), with the HelixAgent fields and
    ``model`` taken out: the body, the HelixAgent fields, model, provider."""
    body = check(load_json_object(raw))
    helix = {k: body.pop(k) for k in HELIX_FIELDS if k in body}
    if "model" not in body and "provider" not in helix:
        raise bad_request("'model' is required", param="model", code="missing_required_parameter")
    model, provider = split_model(body.pop("model", None), helix.get("provider"), known_providers)
    return body, helix, model, provider


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(body.pop("stream", False))
    so = body.get("stream_options") or {}
    include_usage = bool(so.get("include_usage")) if stream else False
    if not stream:
        body.pop("stream_options", None)
    return stream, include_usage


def parse_chat(raw: bytes, known_providers: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Parse a /v1/chat/completions body.  Returns the canonical request and the HelixAgent fields."""
    body, helix, model, provider = _open_body(raw, known_providers, schema.check_chat)
    messages = body.pop("messages")
    stream, include_usage = _stream(body)
    return ChatRequest(model=model, messages=messages, params=body, stream=stream, include_usage=include_usage,
                       provider=provider, endpoint="chat"), helix


def parse_completion(raw: bytes, known_providers: Any) -> tuple[ChatRequest, dict[str, Any]]:
    """Parse a legacy /v1/completions body into a canonical request (``endpoint="completion"``).

    ``prompt`` keeps the original prompt for upstreams that speak the legacy API natively;
    ``messages`` carries it as one user turn for every other provider."""
    body, helix, model, provider = _open_body(raw, known_providers, schema.check_completion)
    prompt = body.pop("prompt")
    if isinstance(prompt, str):
        text = prompt
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        text = prompt[0]
    elif prompt and all(isinstance(p, str) for p in prompt):
        raise bad_request("only one prompt per request is supported; send one request per prompt",
                          param="prompt", code="unsupported_feature")
    else:
        raise bad_request("'prompt' must be a string or an array of one string (token arrays are not "
                          "accepted here)", param="prompt", code="unsupported_feature")
    stream, include_usage = _stream(body)
    messages = [{"role": "user", "content": text}]
    return ChatRequest(model=model, messages=messages, params=body, stream=stream, include_usage=include_usage,
                       provider=provider, endpoint="completion", prompt=prompt), helix


MAX_EMBEDDING_INPUTS = 2048       # OpenAI's documented limit per request
MAX_EMBEDDING_DIMENSIONS = 16384  # larger than any embedding model offers; bounds a mock's allocation


def parse_embeddings(raw: bytes, known_providers: Any) -> EmbeddingRequest:
    body, _helix, model, provider = _open_body(raw, known_providers, schema.check_embeddings)
    inp = body.pop("input")
    if isinstance(inp, list) and not inp:
        raise bad_request("'input' must not be an empty array", param="input", code="invalid_value")
    items: list[Any]
    if isinstance(inp, str):
        items = [inp]
    elif isinstance(inp[0], int):   # one token array (the schema admits only these four shapes)
        items = [inp]
    else:
        items = inp
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS} per request",
                          param="input", code="invalid_value")
    for i, x in enumerate(items):
        if isinstance(x, str) and not x:
            raise bad_request(f"'input[{i}]' is an empty string; embeddings need non-empty input",
                              param="input" if isinstance(inp, str) else f"input[{i}]", code="invalid_value")
    dims = body.get("dimensions")
    if dims is not None and dims > MAX_EMBEDDING_DIMENSIONS:
        raise bad_request(f"'dimensions' must be at most {MAX_EMBEDDING_DIMENSIONS}", param="dimensions",
                          code="invalid_value")
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
