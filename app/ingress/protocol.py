"""OpenAI request models, checked at the ingress before anything reaches an engine.

Only what OpenAI's API defines is typed and range-checked here; engine-specific extras (vLLM's
`top_k`, `min_tokens`, `ignore_eos`, ...) pass through to the engine, which checks them itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = (
    NonEmptyStr
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class OpenAIRequest(BaseModel):
    """Base: the `model` field, and extra fields kept for the engine."""

    model_config = ConfigDict(extra="allow")

    model: NonEmptyStr

    def engine_body(self, model: str) -> dict[str, Any]:
        """The body sent to the engine: fields the client set, with the canonical model name."""
        return {**self.model_dump(exclude_unset=True, by_alias=True), "model": model}

    def prompt_input(self) -> object:
        """What the engine reads as input (for the token estimate)."""
        return None

    def estimated_tokens(self) -> int:
        """What a token limit charges at admission: the input, about 4 characters a token
        (`approx_tokens`), at least 1."""
        return max(1, approx_tokens(self.prompt_input()))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class SamplingRequest(OpenAIRequest):
    """Fields shared by completions and chat completions."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def output_tokens(self) -> int | None:
        return self.max_tokens

    def sequences(self) -> int:
        """Output sequences the engine generates: `n` for each prompt."""
        return self.n

    def estimated_tokens(self) -> int:
        """Prompt tokens (about 4 characters each) plus the most output asked for, for each
        sequence (`n` per prompt): what a token limit charges at admission, as OpenAI's
        limiter does."""
        output = self.output_tokens() or DEFAULT_OUTPUT_TOKENS
        return approx_tokens(self.prompt_input()) + output * self.sequences()


DEFAULT_OUTPUT_TOKENS = 16  # OpenAI's default max_tokens for completions


def approx_tokens(value: object) -> int:
    """Strings at about 4 characters a token, but each non-ASCII character (CJK, emoji, ...)
    a token of its own; integers 1 each; however deeply nested (a loop, not recursion: a body's
    nesting is bounded only on the HTTP path)."""
    total, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if item.isascii():
                total += len(item) // 4 + 1
            else:
                ascii_chars = len(item.encode("ascii", "ignore"))
                total += ascii_chars // 4 + len(item) - ascii_chars + 1
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, BaseModel):
            pending.append(item.model_dump(exclude_none=True))
    return total


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: PromptInput
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompt_input(self) -> object:
        return self.prompt

    def sequences(self) -> int:
        """`max(n, best_of)` for each prompt of a list of prompts."""
        prompts = len(self.prompt) if isinstance(self.prompt, list) and _many(self.prompt) else 1
        return max(self.n, self.best_of or 1) * prompts


def _many(prompt: list[Any]) -> bool:
    """Whether a list prompt is several prompts (texts or token lists), not one token list."""
    return isinstance(prompt[0], str | list)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_input(self) -> object:
        return [m.content for m in self.messages]


class EmbeddingRequest(OpenAIRequest):
    """POST /v1/embeddings."""

    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def prompt_input(self) -> object:
        return self.input


class TokenizeRequest(OpenAIRequest):
    """POST /tokenize: a prompt or chat messages."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def prompt_input(self) -> object:
        return self.prompt if self.messages is None else [m.content for m in self.messages]


class DetokenizeRequest(OpenAIRequest):
    """POST /detokenize."""

    tokens: list[Annotated[int, Field(ge=0)]]

    def prompt_input(self) -> object:
        return self.tokens
