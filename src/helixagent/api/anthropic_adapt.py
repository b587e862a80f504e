"""A /v1/messages request for a provider that is not Anthropic's: :func:`adapt_for` maps or drops the
Anthropic-only features (and names what it dropped) or refuses what would change the answer's meaning;
:func:`lower_for_openai` removes the canonical extensions an OpenAI-format upstream would reject."""
from __future__ import annotations

from typing import Any

from ..canonical import ChatRequest
from ..errors import GatewayError
from ..providers.catalogue import lookup

_FEATURE_TEXT = {"thinking": "extended thinking ('thinking')",
                 "thinking_blocks": "thinking blocks in the conversation history",
                 "prefill": "an assistant prefill (a final assistant message the answer continues)",
                 "top_k": "'top_k'", "effort": "'output_config.effort'"}
# Top-level Anthropic fields refused for another provider: dropping them would change what the model can do.
_REFUSED_ELSEWHERE = {"mcp_servers": "remote MCP servers ('mcp_servers')"}
# Anthropic's efforts as OpenAI / Gemini reasoning efforts
_EFFORT_ELSEWHERE = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _effort_of(thinking: dict[str, Any]) -> str:
    """``thinking`` as a reasoning effort: adaptive is medium; a budget below 4k tokens low, below 16k medium."""
    bt = thinking.get("budget_tokens")
    if thinking.get("type") != "enabled" or not isinstance(bt, int):
        return "medium"
    return "low" if bt < 4096 else "medium" if bt < 16384 else "high"


def adapt_for(req: ChatRequest, info: dict[str, Any], provider: Any, model: str) -> list[str]:
    """Make a /v1/messages request fit ``provider`` -- the router's first choice, not an Anthropic one -- in
    place.  Returns the names of the fields dropped (for ``x-helixagent-dropped-params``); raises a 400 for
    what would change the answer's meaning there (see docs/anthropic-api.md)."""
    wire, typ, name = provider.cfg.wire, provider.cfg.type, provider.name

    def refuse(what: str, param: str) -> GatewayError:
        return GatewayError(400, f"the request uses {what}, which provider {name!r} ({typ}) cannot serve; route "
                                 f"this model to an Anthropic provider or remove it",
                            code="unsupported_feature", param=param, provider=name)

    if "prefill" in info["features"]:
        raise refuse(_FEATURE_TEXT["prefill"], "messages")
    if info["native"]:
        what, path = info["native"][0]
        raise refuse(what, path)
    dropped: list[str] = list(info["dropped"])
    extra = req.extra.get("anthropic")
    if extra:
        for k in extra:
            if k in _REFUSED_ELSEWHERE:
                raise refuse(_REFUSED_ELSEWHERE[k], k)
        for k, v in extra.items():
            if k == "output_config":
                dropped.extend(f"output_config.{x}" for x in v)
            else:
                dropped.append(k)
        req.extra = {w: v for w, v in req.extra.items() if w != "anthropic"}
    p = req.params
    mi = lookup(provider, model)
    reasoning = mi.reasoning if mi is not None else None  # None: the catalogue does not know the model
    can_reason = typ in ("openai", "gemini") and reasoning is True
    th = p.pop("thinking", None)
    if th is not None:
        if can_reason:  # extended thinking -> the model's own reasoning, at the effort its budget implies
            p.setdefault("reasoning_effort", _effort_of(th))
        else:
            dropped.append("thinking")
    eff = p.get("reasoning_effort")  # output_config.effort, or the thinking mapped above
    if eff is not None:
        if can_reason or (wire == "openai" and reasoning is None):
            p["reasoning_effort"] = _EFFORT_ELSEWHERE.get(eff, eff)
        else:
            del p["reasoning_effort"]
            dropped.append("output_config.effort")
    if "top_k" in p and not (wire == "gemini" or typ == "openai_compatible"):
        del p["top_k"]
        dropped.append("top_k")
    if "thinking_blocks" in info["features"]:  # signed reasoning of earlier Claude turns: Claude-only
        for m in req.messages:
            if m.pop("thinking_blocks", None) is not None and m.get("content") is None and not m.get("tool_calls"):
                m["content"] = ""
        dropped.append("thinking_blocks")
    if info["lower"]:
        lower_for_openai(req)
    return list(dict.fromkeys(dropped))


def lower_for_openai(req: ChatRequest) -> None:
    """Remove the Anthropic extensions a non-Anthropic provider would reject (in place).  Images and
    documents a tool returned move to a user message after the run of tool messages (OpenAI-format tool
    messages hold text only)."""
    out: list[dict[str, Any]] = []
    media: list[dict[str, Any]] = []
    for m in req.messages:
        if media and m.get("role") != "tool":
            out.append({"role": "user", "content": media})
            media = []
        c = m.get("content")
        if isinstance(c, list):
            for part in c:
                part.pop("cache_control", None)
                part.pop("anthropic", None)
            if m.get("role") == "tool" and any(part.get("type") != "text" for part in c):
                media.extend(part for part in c if part.get("type") != "text")
                c = [part for part in c if part.get("type") == "text"] or \
                    [{"type": "text", "text": "(the tool's images / documents follow in the next user message)"}]
                m["content"] = c
        for tc in m.get("tool_calls") or ():
            tc.pop("cache_control", None)
        m.pop("cache_control", None)
        if m.pop("is_error", False):
            if isinstance(c, list):
                m["content"] = [{"type": "text", "text": "Error: "}] + c
            else:
                m["content"] = "Error: " + (c or "")
        out.append(m)
    if media:
        out.append({"role": "user", "content": media})
    req.messages[:] = out
    for t in req.params.get("tools") or ():
        t.pop("cache_control", None)
        t.pop("anthropic", None)
    req.params.pop("cache_control", None)
