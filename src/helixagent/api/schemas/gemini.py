"""The Gemini API request schemas (``POST /v1beta/models/{model}:generateContent`` and its streaming,
token-counting and embedding siblings), after the public REST reference (``GenerateContentRequest``,
``Content``, ``Part``, ``Tool``, ``ToolConfig``, ``GenerationConfig``, ``EmbedContentRequest``) and the
official ``google-genai`` SDK's wire output (camelCase names; ``topK`` sent as a float).

The schema fixes every type; the translation in ``api/gemini_format.py`` then checks meaning (which part
kind a part is, function responses matching calls, fields only a Gemini upstream can serve).  Paths use
the bracket style (``contents[0].parts[1].text``)."""
from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, with_config
from typing_extensions import Required, TypedDict

from .base import INT32, OPEN, PosInt, number, validator

Obj = dict[str, Any]


@with_config(OPEN)
class Blob(TypedDict):
    mimeType: str
    data: str


@with_config(OPEN)
class FileData(TypedDict, total=False):
    mimeType: str
    fileUri: Required[str]


@with_config(OPEN)
class FunctionCall(TypedDict, total=False):
    id: str
    name: Required[str]
    args: Obj


@with_config(OPEN)
class FunctionResponse(TypedDict, total=False):
    id: str
    name: Required[str]
    response: Required[Obj]


@with_config(OPEN)
class Part(TypedDict, total=False):
    text: str
    inlineData: Blob
    fileData: FileData
    functionCall: FunctionCall
    functionResponse: FunctionResponse
    thought: bool
    thoughtSignature: str


@with_config(OPEN)
class Content(TypedDict, total=False):
    role: Literal["user", "model", "function", ""]
    parts: Required[list[Part]]


@with_config(OPEN)
class FunctionDeclaration(TypedDict, total=False):
    name: Required[Annotated[str, Field(min_length=1, max_length=128)]]
    description: str
    parameters: Obj
    parametersJsonSchema: Obj


@with_config(OPEN)
class Tool(TypedDict, total=False):
    functionDeclarations: list[FunctionDeclaration]


@with_config(OPEN)
class FunctionCallingConfig(TypedDict, total=False):
    mode: Literal["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"]
    allowedFunctionNames: list[str]


@with_config(OPEN)
class ToolConfig(TypedDict, total=False):
    functionCallingConfig: FunctionCallingConfig


@with_config(OPEN)
class ThinkingConfig(TypedDict, total=False):
    includeThoughts: bool
    thinkingBudget: Annotated[int, Field(ge=-1, le=INT32)]
    thinkingLevel: str


@with_config(OPEN)
class GenerationConfig(TypedDict, total=False):
    temperature: number(0, 2)
    topP: number(0, 1)
    topK: number(0, INT32)
    candidateCount: Annotated[int, Field(ge=1, le=8)]
    maxOutputTokens: PosInt
    stopSequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=5)]
    responseMimeType: str
    responseSchema: Obj
    responseJsonSchema: Union[Obj, bool]
    thinkingConfig: ThinkingConfig
    seed: Annotated[int, Field(ge=-INT32 - 1, le=INT32)]
    presencePenalty: number(-2, 2)
    frequencyPenalty: number(-2, 2)
    responseModalities: list[str]


@with_config(OPEN)
class SafetySetting(TypedDict):
    category: str
    threshold: str


@with_config(OPEN)
class GenerateContentBody(TypedDict, total=False):
    model: str
    provider: str
    cache: bool
    contents: Required[Annotated[list[Content], Field(min_length=1)]]
    systemInstruction: Content
    tools: list[Tool]
    toolConfig: ToolConfig
    generationConfig: GenerationConfig
    safetySettings: list[SafetySetting]
    cachedContent: str
    labels: dict[str, str]


@with_config(OPEN)
class CountTokensBody(TypedDict, total=False):
    contents: list[Content]
    generateContentRequest: GenerateContentBody


@with_config(OPEN)
class EmbedContent(TypedDict):
    parts: Annotated[list[Part], Field(min_length=1)]


@with_config(OPEN)
class EmbedContentBody(TypedDict, total=False):
    model: str
    provider: str
    content: Required[EmbedContent]
    taskType: str
    title: str
    outputDimensionality: Annotated[int, Field(ge=1, le=16384)]


@with_config(OPEN)
class BatchEmbedBody(TypedDict, total=False):
    provider: str
    requests: Required[Annotated[list[EmbedContentBody], Field(min_length=1, max_length=2048)]]


check_generate: Callable[[Any], Any] = validator(GenerateContentBody)
check_count: Callable[[Any], Any] = validator(CountTokensBody)
check_embed: Callable[[Any], Any] = validator(EmbedContentBody)
check_batch_embed: Callable[[Any], Any] = validator(BatchEmbedBody)

__all__ = ["check_generate", "check_count", "check_embed", "check_batch_embed"]
