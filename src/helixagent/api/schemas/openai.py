"""The OpenAI request schemas (chat completions, legacy completions, embeddings), after the official SDK's
param types (``openai/types/chat/completion_create_params.py`` and the types it names).

Every type the API reference allows is accepted; anything else is a 400 naming the path.  Enumerations
the vendor grows often (``detail``, ``service_tier``, ``reasoning_effort``, audio formats) are checked as
strings and left to the upstream; the fields HelixAgent itself reads (roles, content part and tool types,
numbers, stop, tools, tool_choice, response_format) are checked exactly.  Unknown top-level fields and
unknown fields inside objects pass through.  Canonical extensions HelixAgent itself produces and reads
back (``reasoning_content``, ``thinking_blocks``, ``cache_control``, ``is_error``) are typed too, since
provider mappings read them."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, with_config
from typing_extensions import NotRequired, Required, TypedDict

from .anthropic import RedactedThinkingBlock, ThinkingBlock  # the canonical thinking_blocks are Anthropic's
from .base import CLOSED, INT32, OPEN, Int64, NonNegInt, PosInt, number, validator

Obj = dict[str, Any]
Temperature = number(0, 2)
Unit = number(0, 1)
Penalty = number(-2, 2)


@with_config(OPEN)
class CacheControl(TypedDict):
    type: Literal["ephemeral"]
    ttl: NotRequired[str]


# -- content parts ---------------------------------------------------------------------------------------

@with_config(OPEN)
class TextPart(TypedDict):
    type: Literal["text"]
    text: str
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class ImageURL(TypedDict):
    url: str
    detail: NotRequired[str]


@with_config(OPEN)
class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class InputAudio(TypedDict):
    data: str
    format: str


@with_config(OPEN)
class AudioPart(TypedDict):
    type: Literal["input_audio"]
    input_audio: InputAudio


@with_config(OPEN)
class FileFile(TypedDict, total=False):
    file_data: str
    file_id: str
    filename: str


@with_config(OPEN)
class FilePart(TypedDict):
    type: Literal["file"]
    file: FileFile
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class RefusalPart(TypedDict):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Discriminator("type")]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Discriminator("type")]

# -- messages --------------------------------------------------------------------------------------------


@with_config(OPEN)
class SystemMessage(TypedDict):
    role: Literal["system"]
    content: Union[str, list[TextPart]]
    name: NotRequired[str]


@with_config(OPEN)
class DeveloperMessage(TypedDict):
    role: Literal["developer"]
    content: Union[str, list[TextPart]]
    name: NotRequired[str]


@with_config(OPEN)
class UserMessage(TypedDict):
    role: Literal["user"]
    content: Union[str, list[UserPart]]
    name: NotRequired[str]


@with_config(OPEN)
class FunctionCall(TypedDict):
    name: str
    arguments: str


@with_config(OPEN)
class FunctionToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class CustomCall(TypedDict):
    name: str
    input: str


@with_config(OPEN)
class CustomToolCall(TypedDict):
    id: str
    type: Literal["custom"]
    custom: CustomCall


ToolCall = Annotated[Union[FunctionToolCall, CustomToolCall], Discriminator("type")]


@with_config(OPEN)
class AudioRef(TypedDict):
    id: str


@with_config(OPEN)
class AssistantMessage(TypedDict, total=False):
    role: Required[Literal["assistant"]]
    content: Union[str, list[AssistantPart], None]
    name: str
    refusal: Union[str, None]
    tool_calls: list[ToolCall]
    function_call: Union[FunctionCall, None]
    audio: Union[AudioRef, None]
    # canonical extensions: reasoning relayed by HelixAgent, sent back by the client
    reasoning_content: Union[str, None]
    thinking_blocks: list[Annotated[Union[ThinkingBlock, RedactedThinkingBlock], Discriminator("type")]]


@with_config(OPEN)
class ToolMessage(TypedDict):
    role: Literal["tool"]
    content: Union[str, list[TextPart]]
    tool_call_id: str
    is_error: NotRequired[bool]
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class FunctionMessage(TypedDict):
    role: Literal["function"]
    content: Union[str, None]
    name: str


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage,
                          FunctionMessage], Discriminator("role")]

# -- tools -----------------------------------------------------------------------------------------------


@with_config(OPEN)
class FunctionDefinition(TypedDict):
    name: str
    description: NotRequired[str]
    parameters: NotRequired[Obj]
    strict: NotRequired[Union[bool, None]]


@with_config(OPEN)
class FunctionTool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition
    cache_control: NotRequired[CacheControl]


@with_config(OPEN)
class CustomDefinition(TypedDict):
    name: str
    description: NotRequired[str]
    format: NotRequired[Obj]


@with_config(OPEN)
class CustomTool(TypedDict):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[Union[FunctionTool, CustomTool], Discriminator("type")]


@with_config(OPEN)
class Named(TypedDict):
    name: str


@with_config(OPEN)
class NamedFunctionChoice(TypedDict):
    type: Literal["function"]
    function: Named


@with_config(OPEN)
class NamedCustomChoice(TypedDict):
    type: Literal["custom"]
    custom: Named


@with_config(OPEN)
class AllowedTools(TypedDict):
    mode: str
    tools: list[Obj]


@with_config(OPEN)
class AllowedToolsChoice(TypedDict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Union[Literal["none", "auto", "required"],
                   Annotated[Union[NamedFunctionChoice, NamedCustomChoice, AllowedToolsChoice],
                             Discriminator("type")]]


@with_config(OPEN)
class JSONSchema(TypedDict):
    name: str
    description: NotRequired[str]
    schema: NotRequired[Obj]
    strict: NotRequired[Union[bool, None]]


@with_config(OPEN)
class FormatText(TypedDict):
    type: Literal["text"]


@with_config(OPEN)
class FormatJSONObject(TypedDict):
    type: Literal["json_object"]


@with_config(OPEN)
class FormatJSONSchema(TypedDict):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[Union[FormatText, FormatJSONObject, FormatJSONSchema], Discriminator("type")]


@with_config(CLOSED)
class StreamOptions(TypedDict, total=False):
    include_usage: Union[bool, None]
    include_obfuscation: Union[bool, None]


@with_config(OPEN)
class FunctionChoice(TypedDict):
    name: str


# -- request bodies --------------------------------------------------------------------------------------


@with_config(OPEN)
class _Sampling(TypedDict, total=False):
    """Fields chat and legacy completions share (and HelixAgent's own: provider, cache)."""
    model: str
    provider: str
    cache: bool
    stream: Union[bool, None]
    stream_options: Union[StreamOptions, None]
    temperature: Union[Temperature, None]
    top_p: Union[Unit, None]
    presence_penalty: Union[Penalty, None]
    frequency_penalty: Union[Penalty, None]
    max_tokens: Union[PosInt, None]
    n: Union[Annotated[int, Field(ge=1, le=128)], None]
    stop: Union[str, list[str], None]
    seed: Union[Int64, None]
    logit_bias: Union[dict[str, Annotated[int, Field(ge=-100, le=100)]], None]
    user: str
    top_k: Union[NonNegInt, None]       # not OpenAI's; vLLM and Gemini take it (passes through)


@with_config(OPEN)
class ChatBody(_Sampling, total=False):
    messages: Required[Annotated[list[Message], Field(min_length=1)]]
    max_completion_tokens: Union[PosInt, None]
    tools: list[Tool]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    response_format: ResponseFormat
    logprobs: Union[bool, None]
    top_logprobs: Union[Annotated[int, Field(ge=0, le=20)], None]
    functions: list[FunctionDefinition]
    function_call: Union[Literal["none", "auto"], FunctionChoice]
    metadata: Union[dict[str, str], None]
    modalities: Union[list[str], None]
    audio: Union[Obj, None]
    prediction: Union[Obj, None]
    web_search_options: Obj
    reasoning_effort: Union[str, None]
    service_tier: Union[str, None]
    store: Union[bool, None]
    verbosity: Union[str, None]
    safety_identifier: Union[str, None]
    prompt_cache_key: Union[str, None]
    prompt_cache_retention: Union[str, None]


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)]


@with_config(OPEN)
class CompletionBody(_Sampling, total=False):
    prompt: Required[Union[str, list[str], TokenIds, list[TokenIds]]]
    suffix: Union[str, None]
    echo: Union[bool, None]
    best_of: Union[Annotated[int, Field(ge=0, le=20)], None]
    logprobs: Union[Annotated[int, Field(ge=0, le=5)], None]


@with_config(OPEN)
class EmbeddingsBody(TypedDict, total=False):
    model: str
    provider: str
    cache: bool
    input: Required[Union[str, list[str], TokenIds, list[TokenIds]]]
    dimensions: PosInt
    encoding_format: Literal["float", "base64"]
    user: str


check_chat = validator(ChatBody)
check_completion = validator(CompletionBody)
check_embeddings = validator(EmbeddingsBody)
