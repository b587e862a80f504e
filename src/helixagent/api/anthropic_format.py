"""The Anthropic Messages client format: parse ``POST /v1/messages`` bodies into the canonical request,
render canonical answers as Anthropic ``message`` objects and canonical chunks as Anthropic SSE events.

Canonical extensions (how Anthropic-only meaning rides in the OpenAI-shaped canonical request, for an
Anthropic upstream to use; see docs/anthropic-api.md):

* ``cache_control`` stays on the canonical content part it was on (text / image_url / file parts, system
  parts), on ``tools[i]``, on ``tool_calls[i]``, on a ``tool`` message (a breakpoint on a whole
  ``tool_result``) and in ``params`` (the request-level one) -- the LiteLLM convention.  When the first provider the
  router will try is not an Anthropic one, :func:`lower_for_openai` removes them (prompt-cache hints have
  no meaning there; OpenAI and Gemini cache automatically) before the request goes out.
* a ``tool`` message from a ``tool_result`` with ``is_error: true`` carries ``"is_error": True``;
  lowered to an ``Error: `` prefix on its text.
* ``thinking`` (when enabled), ``top_k``, ``reasoning_effort`` (``output_config.effort``) and assistant
  ``thinking`` / ``redacted_thinking`` blocks (``message["thinking_blocks"]``) are Anthropic features;
  :func:`adapt_for` maps or drops them for another provider (and names what it dropped).
* blocks HelixAgent does not translate (``server_tool_use``, ``web_search_tool_result``, ``search_result``,
  ``container_upload``, Files API sources, ... and whatever comes next) ride whole as
  ``{"type": "anthropic_block", "block": {...}}`` parts, in their place; tools of an Anthropic type
  (server tools, ``bash_...``, ``text_editor_...``) stay in ``params["tools"]`` as sent.  Fields of a known
  block or tool that are not translated ride as ``part["anthropic"]`` / ``tool["anthropic"]``.  Top-level
  fields with no canonical meaning (``context_management``, ``mcp_servers``, ``container``,
  ``service_tier``, ...) ride in ``ChatRequest.extra["anthropic"]``.  An Anthropic provider sends all of
  it as it came; for another one :func:`adapt_for` answers a 400 when it would change the answer's
  meaning (Anthropic tools and blocks, ``mcp_servers``, a prefill) and drops the rest, naming it.

The format is written in four modules, re-exported here (callers import this one):
``anthropic_request`` (body -> canonical request), ``anthropic_adapt`` (the request for a provider that
is not Anthropic's), ``anthropic_response`` (canonical answer -> ``message``) and ``anthropic_stream``
(canonical chunks -> SSE events).
"""
from __future__ import annotations

from .anthropic_adapt import adapt_for, lower_for_openai
from .anthropic_request import IMAGE_TYPES, parse_messages
from .anthropic_response import canonical_response_to_anthropic, message_id, render_message, stop_reason_of
from .anthropic_stream import StreamTranslator

__all__ = ["IMAGE_TYPES", "StreamTranslator", "adapt_for", "canonical_response_to_anthropic", "lower_for_openai",
           "message_id", "parse_messages", "render_message", "stop_reason_of"]
