"""Adapting a request to a provider that cannot serve it as asked (``drop_params``), and the response
header that says what was changed.

A vendor mapping (``Provider.prepare``) refuses a parameter its provider has no equivalent for with a 400
``code="unsupported_feature"`` naming the field (``param``).  Routing skips such a candidate during
fallback (mapping.py, ``_Mapped``); with ``drop_params`` on it adapts the request instead, one refused parameter at a
time, and maps it again:

* ``temperature`` above the provider's maximum is clamped to it (Anthropic: 1.0);
* ``n``, ``logprobs``, ``top_logprobs``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
  ``seed`` and ``top_k`` are dropped;
* ``response_format: {"type": "json_object"}`` is dropped and replaced by a system instruction asking for
  a single JSON object (a request, not a guarantee: the header says so with ``->instruction``).

Nothing else is adapted (tools, content parts, audio, other response formats change the answer's meaning):
such a candidate stays skipped.  Every change is named in ``x-helixagent-dropped-params``
(``frequency_penalty,temperature=1.3->1.0``); :func:`add_dropped` is the one way to write that header, for
any code that drops or clamps a client field (the ``/v1/messages`` ingress uses it too).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, Iterable

from ..canonical import ChatRequest

HEADER = "x-helixagent-dropped-params"
UNSUPPORTED = "unsupported_feature"

# A header item: a field name, optionally "=<from>-><to>".  Anything else (a client-chosen field name
# with other characters) is left out of the header: no client value reaches a header unvalidated.
# a name, name=from->to, or the "+N more" an ingress writes after its own cap
_ITEM = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,64}(=[A-Za-z0-9_.+\-]{1,40}->[A-Za-z0-9_.+\-]{1,40})?|\+\d{1,6} more")
_MAX_HEADER = 1024

# The largest temperature a provider type accepts (only those below OpenAI's 2).
TEMPERATURE_MAX = {"anthropic": 1.0}
# Parameters dropped outright when a mapping refuses them.
DROPPABLE = frozenset(("n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
                       "seed", "top_k"))
# Parameters a provider type's mapping accepts and silently ignores (reported when drop_params is on).
IGNORED = {"anthropic": ("seed",)}
JSON_INSTRUCTION = ("Respond with a single valid JSON object and nothing else: no prose, no code fences.")
# How many refused parameters one request may have adapted (each is one more mapping run).
MAX_STEPS = len(DROPPABLE) + 2


def _num(v: Any) -> str:
    return repr(float(v)) if isinstance(v, (int, float)) and math.isfinite(v) else "?"


def adapt(req: ChatRequest, param: str | None, provider_type: str | None) -> tuple[ChatRequest, str] | None:
    """A copy of ``req`` with the refused ``param`` clamped or dropped, and the header item saying so;
    None when ``param`` cannot be adapted honestly (the candidate cannot serve the request).  ``req``
    itself is never changed."""
    p = req.params
    if param is None or p.get(param) is None:
        return None
    v = p[param]
    params = dict(p)
    if param == "temperature":
        mx = TEMPERATURE_MAX.get(provider_type or "")
        if mx is None or not isinstance(v, (int, float)) or isinstance(v, bool) or not v > mx:
            return None
        params["temperature"] = mx
        return replace(req, params=params), f"temperature={_num(v)}->{_num(mx)}"
    if param in DROPPABLE:
        del params[param]
        return replace(req, params=params), param
    if param == "response_format" and isinstance(v, dict) and v.get("type") == "json_object":
        del params[param]
        msgs = [{"role": "system", "content": JSON_INSTRUCTION}, *req.messages]
        return replace(req, params=params, messages=msgs), "response_format=json_object->instruction"
    return None


def ignored(req: ChatRequest, provider_type: str | None) -> list[str]:
    """The request's parameters that a provider type's mapping accepts but ignores."""
    p = req.params
    return [k for k in IGNORED.get(provider_type or "", ()) if p.get(k) is not None]


def header_value(items: Iterable[str]) -> str:
    """The header value for ``items`` (in order, no repeats, only well-formed items, bounded length)."""
    out: list[str] = []
    n = 0
    for it in items:
        if it in out or not _ITEM.fullmatch(it):
            continue
        n += len(it) + 1
        if n > _MAX_HEADER:
            break
        out.append(it)
    return ",".join(out)


def add_dropped(headers: dict[str, str], items: Iterable[str]) -> None:
    """Add ``items`` to the ``x-helixagent-dropped-params`` header in ``headers`` (merged with what an
    earlier stage put there); nothing is written when no item is well-formed."""
    prev = headers.get(HEADER)
    merged = ([*prev.split(","), *items] if prev else list(items))
    v = header_value(merged)
    if v:
        headers[HEADER] = v
