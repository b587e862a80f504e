"""The Anthropic Messages request schema (``POST /v1/messages`` and ``/v1/messages/count_tokens``), after
the official SDK's param types (``anthropic/types/message_create_params.py`` and the block params).

The schema fixes every type; the translation in ``api/anthropic_request.py`` relies on it and checks only
meaning (non-empty values, order of tool results, features a provider lacks), answering what cannot be
translated with ``unsupported_feature``.  Block and source types the translation does not know are admitted here as
``{"type": str}`` objects, so that answer names them.  Paths use Anthropic's own style
(``messages.0.content.1.text``)."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Discriminator, Field, Tag, with_config
from typing_extensions import NotRequired, Required, TypedDict

from .base import OPEN, NonNegInt, PosInt, number, validator

Obj = dict[str, Any]
Unit = number(0, 1)


def _tagged(known: dict[str, Any], other: Any, default: str | None = None) -> Any:
    """A union on ``type`` with a fallback member for type values the translation answers itself."""
    def tag(v: Any) -> str:
        t = v.get("type", default) if isinstance(v, dict) else None
        return f"<{t}>" if isinstance(t, str) and t in known else "<other>"
    members = [Annotated[tp, Tag(f"<{name}>")] for name, tp in known.items()]
    members.append(Annotated[other, Tag("<other>")])
    return Annotated[Union[tuple(members)], Discriminator(tag)]


@with_config(OPEN)
class Typed(TypedDict):
    type: str


@with_config(OPEN)
class CacheControl(TypedDict):
    type: Literal["ephemeral"]
    ttl: NotRequired[str]


@with_config(OPEN)
class TextBlock(TypedDict):
    type: Literal["text"]
    text: str
    cache_control: NotRequired[Union[CacheControl, None]]
    citations: NotRequired[Union[list[Obj], None]]


@with_config(OPEN)
class Base64Source(TypedDict):
    type: Literal["base64"]
    media_type: str
    data: str


@with_config(OPEN)
class URLSource(TypedDict):
    type: Literal["url"]
    url: str


@with_config(OPEN)
class PlainTextSource(TypedDict):
    type: Literal["text"]
    data: str
    media_type: NotRequired[str]


ImageSource = _tagged({"base64": Base64Source, "url": URLSource}, Typed)
DocumentSource = _tagged({"base64": Base64Source, "url": URLSource, "text": PlainTextSource}, Typed)


@with_config(OPEN)
class ImageBlock(TypedDict):
    type: Literal["image"]
    source: ImageSource
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class DocumentBlock(TypedDict):
    type: Literal["document"]
    source: DocumentSource
    title: NotRequired[Union[str, None]]
    context: NotRequired[Union[str, None]]
    cache_control: NotRequired[Union[CacheControl, None]]
    citations: NotRequired[Union[Obj, None]]


ResultPart = _tagged({"text": TextBlock, "image": ImageBlock, "document": DocumentBlock}, Typed)


@with_config(OPEN)
class ToolResultBlock(TypedDict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: NotRequired[Union[str, list[ResultPart], None]]
    is_error: NotRequired[Union[bool, None]]
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class ToolUseBlock(TypedDict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: Obj
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class ThinkingBlock(TypedDict):
    type: Literal["thinking"]
    thinking: str
    signature: NotRequired[str]


@with_config(OPEN)
class RedactedThinkingBlock(TypedDict):
    type: Literal["redacted_thinking"]
    data: str


@with_config(OPEN)
class ServerToolUseBlock(TypedDict):
    """``server_tool_use`` (and ``mcp_tool_use``): a call of a tool the API runs itself."""
    type: Literal["server_tool_use", "mcp_tool_use"]
    id: str
    name: str
    input: Obj
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class ServerToolResultBlock(TypedDict):
    """The result blocks of server tools (``web_search_tool_result``, ``web_fetch_tool_result``,
    ``code_execution_tool_result``, ``bash_code_execution_tool_result``, ``mcp_tool_result``, ...)."""
    type: str
    tool_use_id: str
    content: Any
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class SearchResultBlock(TypedDict):
    type: Literal["search_result"]
    source: str
    title: str
    content: list[TextBlock]
    cache_control: NotRequired[Union[CacheControl, None]]
    citations: NotRequired[Union[Obj, None]]


@with_config(OPEN)
class ContainerUploadBlock(TypedDict):
    type: Literal["container_upload"]
    file_id: str
    cache_control: NotRequired[Union[CacheControl, None]]


_SERVER_RESULTS = ("web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                   "bash_code_execution_tool_result", "text_editor_code_execution_tool_result", "mcp_tool_result",
                   "tool_search_tool_result")

# Every documented block type; any other ``type`` is admitted as ``{"type": str}`` (a block the API added
# after this schema: sent as it is to an Anthropic provider, refused by name for another one).
Block = _tagged({"text": TextBlock, "image": ImageBlock, "document": DocumentBlock,
                 "tool_result": ToolResultBlock, "tool_use": ToolUseBlock, "thinking": ThinkingBlock,
                 "redacted_thinking": RedactedThinkingBlock, "server_tool_use": ServerToolUseBlock,
                 "mcp_tool_use": ServerToolUseBlock, "search_result": SearchResultBlock,
                 "container_upload": ContainerUploadBlock,
                 **{t: ServerToolResultBlock for t in _SERVER_RESULTS}}, Typed)


@with_config(OPEN)
class Message(TypedDict):
    # "system": a system prompt in the conversation (Claude Code sends it so in some modes); text only
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[Block]]


@with_config(OPEN)
class CustomTool(TypedDict):
    name: str
    input_schema: Obj
    type: NotRequired[Literal["custom"]]
    description: NotRequired[str]
    cache_control: NotRequired[Union[CacheControl, None]]


@with_config(OPEN)
class TypedTool(TypedDict):
    """Server tools (``web_search_20250305``, ``code_execution_...``, ``web_fetch_...``), Anthropic-defined
    client tools (``bash_...``, ``text_editor_...``, ``computer_...``, ``memory_...``), ``mcp_toolset``."""
    type: str
    name: NotRequired[str]
    cache_control: NotRequired[Union[CacheControl, None]]


Tool = _tagged({"custom": CustomTool}, TypedTool, default="custom")


@with_config(OPEN)
class ToolChoiceAuto(TypedDict):
    type: Literal["auto"]
    disable_parallel_tool_use: NotRequired[bool]


@with_config(OPEN)
class ToolChoiceAny(TypedDict):
    type: Literal["any"]
    disable_parallel_tool_use: NotRequired[bool]


@with_config(OPEN)
class ToolChoiceTool(TypedDict):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: NotRequired[bool]


@with_config(OPEN)
class ToolChoiceNone(TypedDict):
    type: Literal["none"]
    disable_parallel_tool_use: NotRequired[bool]


ToolChoice = Annotated[Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone], Discriminator("type")]


@with_config(OPEN)
class ThinkingEnabled(TypedDict):
    type: Literal["enabled"]
    budget_tokens: PosInt


@with_config(OPEN)
class ThinkingOther(TypedDict):
    type: Literal["disabled", "adaptive"]


Thinking = Union[ThinkingEnabled, ThinkingOther]


@with_config(OPEN)
class Metadata(TypedDict, total=False):
    user_id: Union[str, None]


@with_config(OPEN)
class OutputFormat(TypedDict):
    type: Literal["json_schema"]
    schema: Obj


@with_config(OPEN)
class OutputConfig(TypedDict, total=False):
    effort: Union[str, None]
    format: Union[OutputFormat, None]


@with_config(OPEN)
class MessagesBody(TypedDict, total=False):
    model: str
    provider: str
    cache: bool
    max_tokens: PosInt
    messages: Required[Annotated[list[Message], Field(min_length=1)]]
    system: Union[str, list[TextBlock]]
    metadata: Metadata
    stop_sequences: list[str]
    stream: bool
    temperature: Unit
    top_p: Unit
    top_k: NonNegInt
    tools: list[Tool]
    tool_choice: ToolChoice
    thinking: Thinking
    cache_control: Union[CacheControl, None]
    output_config: OutputConfig
    # Anthropic fields with no canonical meaning: sent untouched to an Anthropic provider (any other
    # unknown top-level field too), dropped and named -- or refused, mcp_servers -- for another one
    context_management: Union[Obj, None]
    mcp_servers: list[Obj]
    container: Union[str, Obj, None]
    service_tier: str


check_messages: Callable[[Any], Any] = validator(MessagesBody, style="dots")
