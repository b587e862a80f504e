"""CPU cost of the Anthropic and Gemini translations per request (µs), side by side with the OpenAI
pass-through serialisation.  Run: PYTHONPATH=src python bench/provider_mapping.py"""
from __future__ import annotations

import time

import orjson

from helixagent.canonical import ChatRequest
from helixagent.providers.anthropic_mapping import (AnthropicStreamDecoder, anthropic_response_to_canonical,
                                                    canonical_to_anthropic_request)
from helixagent.providers.gemini import (GeminiStreamDecoder, canonical_to_gemini_request,
                                         gemini_response_to_canonical)

REQ = ChatRequest("m", [{"role": "system", "content": "You are helpful."},
                        {"role": "user", "content": "What is the weather in Paris today, roughly?"}],
                  {"max_tokens": 256, "temperature": 0.2, "tools": [{"type": "function", "function": {
                      "name": "get_weather", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]})
AMSG = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "It is sunny. " * 20}],
        "usage": {"input_tokens": 30, "output_tokens": 60, "cache_read_input_tokens": 0}}
AEVENTS = ([{"type": "message_start", "message": dict(AMSG, content=[])},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}]
           + [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok "}}] * 50
           + [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 50}},
              {"type": "message_stop"}])
GRESP = {"candidates": [{"content": {"role": "model", "parts": [{"text": "It is sunny. " * 20}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 60}}
GEVENTS = [{"candidates": [{"content": {"role": "model", "parts": [{"text": "tok "}]}}]}] * 49 + [
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "tok "}]}, "finishReason": "STOP"}],
     "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 50}}]


def bench(name: str, fn, n: int = 20000) -> None:
    fn()
    t = time.process_time()
    for _ in range(n):
        fn()
    print(f"{name:<44} {(time.process_time() - t) / n * 1e6:8.2f} µs")


def a_stream():
    d = AnthropicStreamDecoder("m")
    for e in AEVENTS:
        d.feed(e)


def g_stream():
    d = GeminiStreamDecoder("m")
    for e in GEVENTS:
        d.feed(e)
    d.final()


if __name__ == "__main__":
    bench("openai: request body (orjson pass-through)", lambda: orjson.dumps({**REQ.params, "messages": REQ.messages}))
    bench("anthropic: request mapping + dumps", lambda: orjson.dumps(canonical_to_anthropic_request(REQ)))
    bench("gemini: request mapping + dumps", lambda: orjson.dumps(canonical_to_gemini_request(REQ)))
    bench("anthropic: response mapping", lambda: anthropic_response_to_canonical(AMSG))
    bench("gemini: response mapping", lambda: gemini_response_to_canonical(GRESP, "m"))
    bench("anthropic: 50-token stream decode (total)", a_stream, 2000)
    bench("gemini: 50-token stream decode (total)", g_stream, 2000)
