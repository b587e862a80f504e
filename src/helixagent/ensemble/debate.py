"""Debate: ``rounds`` rounds; in each round after the first, every member still in sees its own last answer
and the others' last answers and revises.  A member that fails in a round is out of the later rounds.  The
last round's answers are closed by a majority vote, or by the judge (``debate_close: judge``, the default
when a judge is configured)."""
from __future__ import annotations

from ..canonical import ChatRequest
from .answers import Answer
from .judge import candidate_text

DEBATE_MARK = "This is round"


def revise_request(req: ChatRequest, own: Answer, others: list[Answer], rnd: int, rounds: int) -> ChatRequest:
    peers = "\n\n".join(f"[{chr(65 + i)}]\n{candidate_text(a)}" for i, a in enumerate(others))
    text = (f"{DEBATE_MARK} {rnd} of {rounds} of a debate between assistants answering the conversation above. "
            f"The other assistants' last answers:\n\n{peers}\n\nReconsider your answer in their light and give "
            "your final answer to the original question. Reply with the answer only.")
    messages = [*req.messages, {"role": "assistant", "content": candidate_text(own)},
                {"role": "user", "content": text}]
    params = {k: v for k, v in req.params.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}
    return ChatRequest(model=req.model, messages=messages, params=params, provider=req.provider)
