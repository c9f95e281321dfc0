"""OpenAI request models, checked at the ingress before anything reaches an engine.

Only what OpenAI's API defines is typed and range-checked here; engine-specific extras (vLLM's
`top_k`, `min_tokens`, `ignore_eos`, ...) pass through to the engine, which checks them itself.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
    # The prompt's tokens as the model's tokenizer counts them, once the ingress has counted
    # them at admission (`app.ingress.prompt_tokens`); None: not counted (the estimate applies).
    _prompt_tokens: int | None = PrivateAttr(None)
    # The prompt's token ids, when the ingress routes by them (`Gateway.routes_by_tokens`).
    _prompt_ids: list[int] | None = PrivateAttr(None)

    def engine_body(self, model: str) -> dict[str, Any]:
        """The body sent to the engine: fields the client set, with the canonical model name."""
        return {**self.model_dump(exclude_unset=True, by_alias=True), "model": model}

    def prompt_input(self) -> object:
        """What the engine reads as input (for the token estimate)."""
        return None

    def prompt_tokens(self) -> int:
        """The prompt's tokens: counted with the model's tokenizer when the ingress did
        (`counted`), else estimated (`approx_tokens`)."""
        counted = self._prompt_tokens
        return counted if counted is not None else approx_tokens(self.prompt_input())

    def counted(self, prompt_tokens: int | None, ids: list[int] | None = None) -> None:
        """Record the prompt's tokens counted with the model's tokenizer (and its ids)."""
        self._prompt_tokens = prompt_tokens
        self._prompt_ids = ids

    def charge(self, prompt_tokens: int) -> int:
        """What a token limit charges at admission for a prompt of `prompt_tokens`: the input,
        at least 1."""
        return max(1, prompt_tokens)

    def estimated_tokens(self) -> int:
        """What a token limit charges at admission (`charge`): the prompt counted with the
        model's tokenizer when the ingress has it, else about 4 characters a token
        (`approx_tokens`)."""
        return self.charge(self.prompt_tokens())


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

    def charge(self, prompt_tokens: int) -> int:
        """Prompt tokens plus the most output asked for, for each sequence (`n` per prompt):
        what a token limit charges at admission, as OpenAI's limiter does."""
        output = self.output_tokens() or DEFAULT_OUTPUT_TOKENS
        return prompt_tokens + output * self.sequences()


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


class _Open(BaseModel):
    """A part of a request: OpenAI's fields checked, others kept for the engine."""

    model_config = ConfigDict(extra="allow")


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(_Open):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Open):
    """A tool call of an assistant message."""

    id: NonEmptyStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs 'tool_call_id'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have 'tool_calls'")
        return self


class FunctionDefinition(_Open):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Open):
    """A tool the model may call: a function."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    """`tool_choice` naming the function the model must call."""

    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. With `tools`, any `tool_choice` but `"none"` needs the model's
    engine started with a tool parser (`enable_auto_tool_choice`, `tool_call_parser`);
    `"required"` or a named function then make any model call one (structured outputs)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(
        cls, choice: str | NamedToolChoice | None, info: ValidationInfo
    ) -> str | NamedToolChoice | None:
        tools: list[Tool] | None = info.data.get("tools")
        if choice is None or choice == "none":
            return choice
        if not tools:
            raise ValueError("give 'tools' to choose from")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in tools]
            if choice.function.name not in names:
                raise ValueError(
                    f"function {choice.function.name!r} is not in tools: {', '.join(names)}"
                )
        return choice

    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_input(self) -> object:
        calls = [m.tool_calls for m in self.messages if m.tool_calls]
        return [[m.content for m in self.messages], calls, self.tools]


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


# A text to score, or vLLM's multimodal `{"content": [parts]}`.
ScoreInput = NonEmptyStr | dict[str, Any]
ScoreInputs = ScoreInput | Annotated[list[ScoreInput], Field(min_length=1)]
# vLLM's names for the two sides of /score: each pair of fields is one way to give them.
SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
               ("text_1", "text_2"))  # fmt: skip
SCORE_SIDES = tuple(dict.fromkeys(side for pair in SCORE_PAIRS for side in pair))


class PoolingRequest(OpenAIRequest):
    """Fields vLLM's pooling endpoints share; charged by their input, like embeddings."""

    ENDPOINT: ClassVar[Literal["score", "rerank"]]

    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    user: str | None = None


class ScoreRequest(PoolingRequest):
    """POST /v1/score (and /score), vLLM's score API for pooling models: the relevance of each
    pair of inputs, given as `queries` with `documents` (or `items`), or `data_1`/`data_2`,
    or `text_1`/`text_2`; one side's list as long as the other's, or one input."""

    ENDPOINT = "score"
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None

    @model_validator(mode="after")
    def _one_pair(self) -> ScoreRequest:
        given = [pair for pair in SCORE_PAIRS if self.model_fields_set.issuperset(pair)]
        if len(given) != 1 or len(self.model_fields_set.intersection(SCORE_SIDES)) != 2:
            ways = "; ".join(" and ".join(f"'{k}'" for k in pair) for pair in SCORE_PAIRS)
            raise ValueError(f"give one pair of inputs to score: {ways}")
        first, second = (_listed(getattr(self, k)) for k in given[0])
        if len(first) not in (1, len(second)):
            raise ValueError(
                f"'{given[0][0]}' must have one input or as many as '{given[0][1]}' "
                f"({len(first)} and {len(second)} given)"
            )
        return self

    def prompt_input(self) -> object:
        return [getattr(self, side) for side in SCORE_SIDES]


class RerankRequest(PoolingRequest):
    """POST /v1/rerank (and /rerank), vLLM's (Jina- and Cohere-style) rerank API: `documents`
    ordered by their relevance to `query`, the best `top_n` (0: all)."""

    ENDPOINT = "rerank"
    query: ScoreInput
    documents: ScoreInputs
    top_n: int = Field(0, ge=0)

    def prompt_input(self) -> object:
        return [self.query, self.documents]


def _listed(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]
