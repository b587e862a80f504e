"""The exact-match cache key.

A key is a 128-bit BLAKE2b digest of a canonical JSON document (``orjson`` with ``OPT_SORT_KEYS``, so
neither key order nor whitespace of the client's body matters) holding everything that changes the
answer:

* the endpoint (``chat`` or the legacy ``completion`` prompt API);
* the tenant scope (``cache.scope: application``: the caller's application, else its key id, else its
  user id; ``global``: one shared namespace);
* the *resolved* target: the provider name and upstream model of the first routing candidate
  (``router.candidates(model, pinned)[0]``), so ``gpt-4o``, ``openai/gpt-4o`` and an alias that
  resolves to the same provider and model share entries, while the same model name on two providers
  does not;
* the messages (which include tool results and images);
* every other request parameter (tools, tool_choice, response_format, temperature, top_p, max_tokens,
  stop, seed, n, logprobs, penalties, logit_bias, parallel_tool_calls, reasoning_effort, and any field
  HelixAgent does not know) -- except the ones listed in :data:`IGNORED_PARAMS`, which do not change the
  answer.

Numbers of the sampling parameters are normalised (``0`` and ``0.0`` are one key).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

from ..canonical import ChatRequest

if TYPE_CHECKING:
    from ..pipeline import Identity

# Request fields that do not change the answer and so never split the cache.
IGNORED_PARAMS = frozenset((
    "user",               # end-user id for abuse monitoring
    "stream",             # transport, not content (a streamed answer serves a non-streamed request)
    "stream_options",     # include_usage: only whether the usage chunk is sent
    "metadata",           # tags for OpenAI's stored completions / dashboards
    "store",              # whether OpenAI keeps the completion
    "safety_identifier",  # the successor of `user`
    "prompt_cache_key",   # routing hint for the upstream's prompt cache
    "cache_control",      # Anthropic automatic prompt caching: a billing/latency hint, not content
))
# Numeric parameters whose int and float spellings are the same value.
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "min_p", "top_k")

_SORT = orjson.OPT_SORT_KEYS
_blake2b = hashlib.blake2b


def scope_of(identity: Identity | None, mode: str) -> str:
    """The tenant part of the key."""
    if mode == "global" or identity is None:
        return ""
    if identity.application:
        return "a:" + identity.application
    if identity.key_id:
        return "k:" + identity.key_id
    if identity.user_id:
        return "u:" + identity.user_id
    return ""


def tenant_scope(identity: Identity | None) -> str:
    """The tenant part of the key under the ``multi_tenant`` feature flag: application *and* user (each
    user of an application has their own entries), else the key id; ``cache.scope: global`` does not
    apply (docs/features.md)."""
    if identity is None:
        return ""
    app, user = identity.application, identity.user_id
    if app or user:
        return "t:" + (app or "") + "\x00" + (user or "")
    if identity.key_id:
        return "k:" + identity.key_id
    return ""


def canonical_params(params: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in params.items() if k not in IGNORED_PARAMS}
    for k in _FLOAT_PARAMS:
        v = out.get(k)
        if type(v) is int:
            out[k] = float(v)
    return out


def canonical_form(req: ChatRequest, scope: str, provider: str, model: str) -> bytes:
    """The bytes that are hashed (exposed for tests and debugging)."""
    form = [1, req.endpoint, scope, provider, model, req.messages, canonical_params(req.params)]
    if req.anthropic_beta:  # a beta can change the answer (an Anthropic upstream receives it)
        form.append(req.anthropic_beta)
    if req.extra:  # vendor-only fields (context_management, ...) reach the upstream too
        form.append(req.extra)
    if req.anthropic_query:
        form.append(req.anthropic_query)
    return orjson.dumps(form, option=_SORT)


def cache_key(req: ChatRequest, scope: str, provider: str, model: str) -> str:
    """Hex digest identifying the answer.  Raises ``TypeError``/``orjson.JSONEncodeError`` for a body
    that cannot be canonicalised (e.g. an integer beyond 64 bits): such a request is not cached."""
    return _blake2b(canonical_form(req, scope, provider, model), digest_size=16).hexdigest()
