"""The judge: a configured model that receives the panel's answers and writes the answer (``synthesis``,
the default) or names the best candidate (``judge_mode: pick``, answered as ``{"choice": n, "reason": ...}``;
the candidate is returned unchanged, with the judge's reason)."""
from __future__ import annotations

import re
from typing import Any

import orjson

from ..canonical import ChatRequest, text_of
from .answers import Answer

JUDGE_MARK = "You are the judge of a panel of"
# request fields that make no sense for the judge's own call
_DROP = ("tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs", "n", "functions",
         "function_call")
_OBJ = re.compile(r"\{.*\}", re.S)


def candidate_text(a: Answer) -> str:
    msg = a.message
    calls = msg.get("tool_calls")
    if calls:
        return "Tool calls: " + orjson.dumps([c.get("function") for c in calls]).decode()
    return text_of(msg.get("content"))


def judge_request(req: ChatRequest, answers: list[Answer], mode: str, model: str, provider: str) -> ChatRequest:
    cands = "\n\n".join(f"[{i + 1}]\n{candidate_text(a)}" for i, a in enumerate(answers))
    if mode == "pick":
        task = ('Decide which candidate answers the conversation above best. Reply with only a JSON object: '
                '{"choice": <the number of the best candidate>, "reason": "<one sentence>"}.')
    else:
        task = ("Write the best final answer to the conversation above, keeping what the candidates got right and "
                "correcting what they got wrong. Reply with the answer only; do not mention the candidates.")
    text = (f"{JUDGE_MARK} {len(answers)} assistants who answered the conversation above.\n\n"
            f"Candidate answers:\n\n{cands}\n\n{task}")
    params = {k: v for k, v in req.params.items() if k not in _DROP}
    if mode == "pick":
        params.pop("response_format", None)
    return ChatRequest(model=model, messages=[*req.messages, {"role": "user", "content": text}], params=params,
                       provider=provider)


def parse_pick(text: str, n: int) -> tuple[int, str] | None:
    """(0-based candidate index, reason) from the judge's answer, or None when it does not say one."""
    m = _OBJ.search(text or "")
    if m is None:
        return None
    try:
        obj: Any = orjson.loads(m.group(0))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    choice = obj.get("choice")
    if isinstance(choice, str) and choice.strip().isdigit():
        choice = int(choice.strip())
    if not isinstance(choice, int) or isinstance(choice, bool) or not 1 <= choice <= n:
        return None
    reason = obj.get("reason")
    return choice - 1, reason if isinstance(reason, str) else ""
