"""One member's outcome in a panel (an answer, or why it was left out), and the normalised form answers are
compared in."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..canonical import ChatResponse, Usage, text_of
from ..errors import GatewayError
from .spec import Member

ANSWERED = "answered"
SUMMARY_CHARS = 200
_WS = re.compile(r"\s+")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*)\n```$", re.S)


@dataclass(slots=True)
class Answer:
    member: Member
    status: str                               # answered | failed | timeout | cancelled
    request_id: str = ""
    response: ChatResponse | None = None
    latency: float = 0.0
    usage: Usage | None = None
    cost: float | None = None
    error: GatewayError | None = None
    reason: str | None = None                 # why it was left out
    confidence: float | None = None           # from token logprobs, when the provider returned them
    score: float | None = None                # the strategy's score of this answer
    key: str | None = None                    # normalised answer (votes compare these)
    round: int = 1

    @property
    def ok(self) -> bool:
        return self.status == ANSWERED

    @property
    def message(self) -> dict[str, Any]:
        assert self.response is not None
        choices = self.response.body.get("choices") or [{}]
        msg: dict[str, Any] = choices[0].get("message") or {}
        return msg

    @property
    def text(self) -> str:
        return text_of(self.message.get("content")) if self.response is not None else ""

    def summary(self) -> str:
        if self.response is None:
            return ""
        msg = self.message
        calls = msg.get("tool_calls")
        if calls:
            fns = [c.get("function") or {} for c in calls]
            s = "; ".join(f"{fn.get('name', '')}({fn.get('arguments', '')})" for fn in fns)
        else:
            s = self.text
        return s if len(s) <= SUMMARY_CHARS else s[:SUMMARY_CHARS - 1] + "…"


def normalise(msg: dict[str, Any]) -> str:
    """The form two answers are equal in: tool calls by name and (structurally compared) arguments; text
    that is JSON (a fenced ```json block too) compared structurally; other text with whitespace collapsed and
    case folded."""
    calls = msg.get("tool_calls")
    if calls:
        parts = []
        for c in calls:
            fn = c.get("function") or c.get("custom") or {}
            parts.append([fn.get("name", ""), _structural(fn.get("arguments") or fn.get("input") or "")])
        return "tools:" + orjson.dumps(parts, option=orjson.OPT_SORT_KEYS).decode()
    text = text_of(msg.get("content")).strip()
    m = _FENCE.match(text)
    inner = m.group(1).strip() if m else text
    if inner[:1] in ("{", "["):
        try:
            return "json:" + orjson.dumps(orjson.loads(inner), option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONDecodeError:
            pass
    return "text:" + _WS.sub(" ", text).casefold()


def _structural(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return orjson.loads(args)
        except orjson.JSONDecodeError:
            return _WS.sub(" ", args.strip())
    return args


def logprob_confidence(body: dict[str, Any]) -> float | None:
    """exp(mean token logprob) of the first choice's content tokens, or None when the answer has none."""
    choices = body.get("choices") or ()
    if not choices:
        return None
    lp = choices[0].get("logprobs") or {}
    toks = lp.get("content") if isinstance(lp, dict) else None
    vals = [t["logprob"] for t in toks or () if isinstance(t, dict) and isinstance(t.get("logprob"), (int, float))
            and not isinstance(t.get("logprob"), bool)]
    if not vals:
        return None
    return max(0.0, min(1.0, math.exp(sum(vals) / len(vals))))
