"""The body of `POST /v1/responses`, checked before anything reaches an engine.

Only text is served: `input` as a string or a list of messages (roles user, system, developer,
assistant; content a string or `input_text` / `output_text` parts). Tools, other item types
(images, files, function calls, item references), structured output formats, reasoning and
background mode are refused with a 400 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.ingress.protocol import NonEmptyStr

Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A part of a message's content: text (the only kind served)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier output's, sent back as input
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    """A message of `input`: OpenAI's easy form (no `type`) or an item (`type: message`)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Annotated[list[TextPart], Field(min_length=1)]  # a string: one text part
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, content: Any) -> Any:
        return [{"type": "input_text", "text": content}] if isinstance(content, str) else content


class TextFormat(_Strict):
    type: Literal["text"]


class TextOptions(_Strict):
    """`text`: only plain text output (`format: {"type": "text"}`)."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Strict):
    """POST /v1/responses."""

    model: NonEmptyStr
    input: Annotated[list[InputMessage], Field(min_length=1)]  # a string: one user message
    instructions: str | None = None
    previous_response_id: NonEmptyStr | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    metadata: Metadata | None = None
    user: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None
    include: Annotated[list[Any], Field(max_length=0)] | None = None
    reasoning: None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_as_message(cls, given: Any) -> Any:
        if isinstance(given, str) and given:
            return [{"role": "user", "content": given}]
        return given

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tools are not supported by this server's /v1/responses")
        return tools

    @field_validator("metadata")
    @classmethod
    def _sixteen_keys(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is not None and len(metadata) > 16:
            raise ValueError("metadata holds at most 16 keys")
        return metadata
