"""The OpenAI Responses API request schema (``POST /v1/responses``, ``POST /v1/responses/input_tokens``), after
the official SDK's param types (``openai/types/responses/response_create_params.py`` and the item types it
names).

The fields HelixAgent reads are checked exactly (``input`` as a string or items, message content parts,
function calls and their outputs, reasoning items, tools, ``tool_choice``, ``text.format``, ``reasoning``,
numbers, ``store``, ``include``, ``truncation``); item and tool types HelixAgent does not translate are
accepted here (an OpenAI upstream takes them natively) and refused later, naming the item, when the
request goes to another provider.  Unknown top-level fields pass through to an OpenAI upstream."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import with_config
from typing_extensions import NotRequired, TypedDict

from .base import OPEN, PosInt, number, validator

Obj = dict[str, Any]
Temperature = number(0, 2)
Unit = number(0, 1)


@with_config(OPEN)
class ContentPart(TypedDict):
    """input_text / input_image / input_file / output_text / refusal (checked by type in responses_format)."""
    type: str
    text: NotRequired[str]
    image_url: NotRequired[Union[str, None]]
    file_id: NotRequired[Union[str, None]]
    detail: NotRequired[str]
    file_data: NotRequired[str]
    file_url: NotRequired[str]
    filename: NotRequired[str]
    refusal: NotRequired[str]
    annotations: NotRequired[list[Obj]]


@with_config(OPEN)
class SummaryPart(TypedDict):
    type: Literal["summary_text"]
    text: str


@with_config(OPEN)
class InputItem(TypedDict):
    """One input item.  Messages may omit ``type``; the other fields depend on ``type`` and are checked
    by the translation (``input[i].call_id`` is required for a function_call, ...)."""
    type: NotRequired[str]
    role: NotRequired[str]
    content: NotRequired[Union[str, list[ContentPart]]]
    id: NotRequired[Union[str, None]]
    status: NotRequired[Union[str, None]]
    call_id: NotRequired[str]
    name: NotRequired[str]
    arguments: NotRequired[str]
    output: NotRequired[Union[str, list[ContentPart]]]
    summary: NotRequired[list[SummaryPart]]
    encrypted_content: NotRequired[Union[str, None]]


@with_config(OPEN)
class Tool(TypedDict):
    type: str
    name: NotRequired[str]
    description: NotRequired[Union[str, None]]
    parameters: NotRequired[Union[Obj, None]]
    strict: NotRequired[Union[bool, None]]


@with_config(OPEN)
class ToolChoiceObject(TypedDict):
    type: str
    name: NotRequired[str]
    mode: NotRequired[str]
    tools: NotRequired[list[Obj]]


@with_config(OPEN)
class TextFormat(TypedDict):
    type: Literal["text", "json_schema", "json_object"]
    name: NotRequired[str]
    schema: NotRequired[Obj]
    description: NotRequired[str]
    strict: NotRequired[Union[bool, None]]


@with_config(OPEN)
class TextConfig(TypedDict):
    format: NotRequired[TextFormat]
    verbosity: NotRequired[Union[Literal["low", "medium", "high"], None]]


@with_config(OPEN)
class Reasoning(TypedDict):
    effort: NotRequired[Union[str, None]]
    summary: NotRequired[Union[Literal["auto", "concise", "detailed"], None]]
    generate_summary: NotRequired[Union[Literal["auto", "concise", "detailed"], None]]


@with_config(OPEN)
class ResponsesBody(TypedDict, total=False):
    model: str
    input: Union[str, list[InputItem]]
    instructions: Union[str, None]
    tools: list[Tool]
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceObject]
    parallel_tool_calls: Union[bool, None]
    text: TextConfig
    reasoning: Union[Reasoning, None]
    max_output_tokens: Union[PosInt, None]
    metadata: Union[dict[str, str], None]
    temperature: Union[Temperature, None]
    top_p: Union[Unit, None]
    user: str
    store: Union[bool, None]
    include: Union[list[str], None]
    truncation: Union[Literal["auto", "disabled"], None]
    stream: Union[bool, None]
    previous_response_id: Union[str, None]
    background: Union[bool, None]
    provider: str
    cache: bool


check_responses = validator(ResponsesBody)
