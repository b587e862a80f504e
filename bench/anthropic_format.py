#!/usr/bin/env python3
"""CPU cost of the Anthropic client format, side by side with the OpenAI one (in-process, no network).

For the same conversation expressed in each format it measures CPU microseconds per call of:
  parse   : request bytes -> canonical request (openai_format.parse_chat vs anthropic_format.parse_messages)
  render  : canonical response -> response bytes (render_chat + orjson vs render_message + orjson)
  stream  : a 40-chunk canonical stream -> SSE bytes (OpenAI `data:` framing vs StreamTranslator)

Usage: PYTHONPATH=src /work/venv/bin/python bench/anthropic_format.py [--n 20000]
"""
from __future__ import annotations

import argparse
import time

import orjson

from helixagent.api import anthropic_format as afmt
from helixagent.api import openai_format as ofmt
from helixagent.canonical import ChatResponse, Usage, new_chunk, new_completion, usage_chunk

TOOLS_A = [{"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
TOOLS_O = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": TOOLS_A[0]["input_schema"]}}]
SMALL_A = {"model": "gpt-4o-mini", "max_tokens": 256, "system": "You are terse.",
           "messages": [{"role": "user", "content": "Hello there, how are you today?"}]}
SMALL_O = {"model": "gpt-4o-mini", "max_tokens": 256,
           "messages": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "Hello there, how are you today?"}]}
TOOL_A = {"model": "gpt-4o-mini", "max_tokens": 256, "tools": TOOLS_A, "tool_choice": {"type": "auto"},
          "messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                                         {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                          "input": {"city": "Paris"}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                     "content": "18C sunny"}]}]}
TOOL_O = {"model": "gpt-4o-mini", "max_tokens": 256, "tools": TOOLS_O, "tool_choice": "auto",
          "messages": [{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": "Checking.", "tool_calls": [
                           {"id": "toolu_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                       {"role": "tool", "tool_call_id": "toolu_1", "content": "18C sunny"}]}


def cpu_us(fn, n: int) -> float:
    for _ in range(min(1000, n)):
        fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    rows = []
    for label, a, o in (("parse small", SMALL_A, SMALL_O), ("parse tools 3-turn", TOOL_A, TOOL_O)):
        ra, ro = orjson.dumps(a), orjson.dumps(o)
        rows.append((label, cpu_us(lambda: ofmt.parse_chat(ro, ()), n),  # noqa: B023 - called in this iteration
                     cpu_us(lambda: afmt.parse_messages(ra, ()), n)))  # noqa: B023 - called in this iteration
    u = Usage(20, 12, 32)
    body = new_completion("chatcmpl-x", "gpt-4o-mini", {"role": "assistant", "content": "word " * 60}, "stop", u)
    resp = ChatResponse(body, u, "openai", "gpt-4o-mini")
    rows.append(("render 60-word answer", cpu_us(lambda: orjson.dumps(ofmt.render_chat(resp)), n),
                 cpu_us(lambda: orjson.dumps(afmt.render_message(resp)), n)))
    chunks = [new_chunk("chatcmpl-x", "gpt-4o-mini", 1, {"role": "assistant", "content": ""})]
    chunks += [new_chunk("chatcmpl-x", "gpt-4o-mini", 1, {"content": " word"}) for _ in range(38)]
    chunks += [new_chunk("chatcmpl-x", "gpt-4o-mini", 1, {}, "stop"), usage_chunk("chatcmpl-x", "gpt-4o-mini", 1, u)]
    msgs = SMALL_O["messages"]

    def oa_stream() -> None:
        for c in chunks:
            b"data: " + orjson.dumps(c) + b"\n\n"

    def an_stream() -> None:
        tr = afmt.StreamTranslator("gpt-4o-mini", msgs)
        for c in chunks:
            tr.feed(c)
        tr.end()

    sn = max(1, n // 10)
    rows.append(("stream 40 chunks (whole stream)", cpu_us(oa_stream, sn), cpu_us(an_stream, sn)))
    print(f"{'operation':34} {'OpenAI µs':>10} {'Anthropic µs':>13}")
    for label, o_us, a_us in rows:
        print(f"{label:34} {o_us:10.2f} {a_us:13.2f}")


if __name__ == "__main__":
    main()
