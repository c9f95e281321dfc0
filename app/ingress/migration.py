"""Streams that outlive their engine replica: mid-stream migration.

A completions or chat stream whose engine replica fails after the client got tokens continues
on another replica, on the same client connection:

1. The ingress asks the engine for the stream's token ids (vLLM's `return_token_ids`): the
   prompt's in the first chunk, then each chunk's new ones. `Stream.take` notes them and takes
   them out of the chunks (`null`, as vLLM sends without the option) unless the client asked
   for them too.
2. When the stream breaks after its first chunk (the connection drops or stalls, the engine's
   error event comes, or it ends without `[DONE]`), `Stream.continuation` is a completion for
   another replica: the prompt's token ids (a chat's as its template rendered them), then the
   tokens already sent, `max_tokens` (and `min_tokens`) reduced by their count, the request's
   sampling parameters.
3. The continuation's chunks reach the client in the original stream's shape (its `id`,
   `created` and `model`; a chat's `delta`), then the whole answer's usage when the client asked
   for it, the comment `: vrstack-migrated <n> <replica ids> <tokens>` (the ids `-` when
   tenants share the stack, as the routing headers leave them out), and `[DONE]`.

Greedy requests continue exactly: the continuation's tokens are those an uninterrupted run
makes. Sampled ones continue with a seam: a new random stream at the break (a `seed` restarts
there), and `frequency_penalty`/`presence_penalty` do not count the tokens before it (they are
prompt to the continuation); text held back at the break (a partial stop string, or a character
whose bytes span tokens) is not sent. Not migrated (they end with an error event as before):
`n` or `best_of` above 1, several prompts, `echo`, `suffix`, logprobs, tools, structured output,
`continuous_usage_stats`, and chats of models with a reasoning parser.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.engines.http_server import USAGE_COMMENT, Usage
from app.engines.items import Endpoint
from app.ingress.engine_http import EngineResponse, Stopped
from app.ingress.protocol import (
    DEFAULT_OUTPUT_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)
from app.ingress.relay import Send, parse_usage

logger = logging.getLogger("vrstack.ingress")
MIGRATED_COMMENT = b": vrstack-migrated"
DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_IDS_KEY = b'token_ids":'
_IDS_LIST = re.compile(rb"\s*(\[[0-9,\s]*\])")
_FINISHED = re.compile(rb'"finish_reason":\s*"')
_EMPTY_DELTA = re.compile(rb'"delta":\s*\{\}')
_NOT_FINISHED = re.compile(rb'"finish_reason":\s*null')
# What a continuation keeps of the original body: the sampling parameters vLLM's completions
# and chats share (the rest is the chat's, or set anew).
CARRIED = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
     "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "bad_words",
     "allowed_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
     "include_stop_str_in_output", "priority", "user", "vllm_xargs"}
)  # fmt: skip
STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_regex",
              "guided_choice", "guided_grammar", "guided_decoding_backend")  # fmt: skip


def migratable(
    endpoint: Endpoint, request: OpenAIRequest, engine_args: Mapping[str, Any]
) -> Stream | None:
    """The state to continue the request's stream elsewhere, or None when it is not one that
    can be (see the module docstring)."""
    if not isinstance(request, CompletionRequest | ChatCompletionRequest) or not request.stream:
        return None
    extra = request.model_extra or {}
    options = request.stream_options
    if (
        request.n != 1
        or extra.get("echo")
        or any(extra.get(key) not in (None, {"type": "text"}) for key in STRUCTURED)
        or (options is not None and (options.model_extra or {}).get("continuous_usage_stats"))
    ):
        return None
    if isinstance(request, CompletionRequest):
        if (
            request.echo
            or request.suffix
            or request.logprobs is not None
            or (request.best_of or 1) > 1
            or (isinstance(request.prompt, list) and isinstance(request.prompt[0], str | list))
        ):
            return None
        limit = request.output_tokens() or DEFAULT_OUTPUT_TOKENS
    else:
        if (
            request.logprobs
            or request.top_logprobs
            or (request.tools and request.tool_choice != "none")
            or engine_args.get("reasoning_parser")
        ):
            return None
        limit = request.output_tokens()
    return Stream(
        chat=endpoint == "chat",
        wants_ids=bool(extra.get("return_token_ids")),
        wants_usage=bool(options is not None and options.include_usage),
        max_tokens=limit,
        min_tokens=extra.get("min_tokens") if isinstance(extra.get("min_tokens"), int) else 0,
    )


@dataclass(slots=True)
class Stream:
    """What the ingress keeps of a migratable stream as its chunks pass, and how it goes on."""

    chat: bool
    wants_ids: bool = False  # the client asked for token ids itself
    wants_usage: bool = False  # the client asked for the usage chunk
    max_tokens: int | None = None  # None: to the end of the context (a chat's default)
    min_tokens: int = 0
    id: str | None = None  # the stream's, from its first chunk
    created: int = 0
    model: str = ""
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # a choice's finish_reason was sent
    done: bool = False  # the stream ended ([DONE] sent)
    broken: bool = False  # the engine's error event came (not sent)
    error_event: bytes | None = None  # that event, sent if the stream cannot go on
    usage: Usage | None = None  # the engine's, as its comment told it
    continuing: bool = False  # the chunks come from a continuation (completions' shape)
    replicas: list[str] = field(default_factory=list)  # each replica that served a part
    outcome: str | None = None  # after a break: "continued" or "failed"

    # -- the original stream ------------------------------------------------------------------
    def take(self, event: bytes) -> bytes:
        """One SSE event of the engine's (without its blank line): what the client gets of it
        (b"" for nothing), noting its token ids, usage, end or error."""
        if self.continuing:
            return self._continued(event)
        if event == DONE:
            self.done = True
            return DONE + b"\n\n"
        if event.startswith(USAGE_COMMENT):
            self.usage = parse_usage(event[len(USAGE_COMMENT) :])
            return b""
        if event.startswith(_ERROR):
            if _client_error(event):  # the engine refused it: not the replica's failure
                return event + b"\n\n"
            self.broken, self.error_event = True, event + b"\n\n"
            return b""
        if not event.startswith(b"data: "):
            return event + b"\n\n"
        if self.id is None:
            self._first(event)
        lists = _id_lists(event)
        for start, end, prompt in lists:
            if not prompt:
                self.generated.extend(_ints(event[start + 1 : end - 1]))
        if _FINISHED.search(event):
            self.finished = True
        if self.wants_ids or not lists:
            return event + b"\n\n"
        if self.chat and _EMPTY_DELTA.search(event) and _NOT_FINISHED.search(event):
            return b""  # a token with no text yet: vLLM sends it only for its ids
        parts, at = [], 0
        for start, end, _ in lists:
            parts += (event[at:start], b"null")
            at = end
        parts += (event[at:], b"\n\n")
        return b"".join(parts)

    def _first(self, event: bytes) -> None:
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return
        self.id = str(chunk.get("id") or "")
        self.created = int(chunk.get("created") or 0)
        self.model = str(chunk.get("model") or "")
        choices = chunk.get("choices") or [{}]
        ids = chunk.get("prompt_token_ids") or choices[0].get("prompt_token_ids")
        if isinstance(ids, list):
            self.prompt_ids = [int(i) for i in ids]

    # -- going on elsewhere ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether the client has the stream's first chunk (a continuation keeps its shape)."""
        return self.id is not None

    def can_continue(self) -> bool:
        return self.prompt_ids is not None

    @property
    def complete(self) -> bool:
        """Whether the answer needs no more tokens: it said why it finished, or made them all."""
        return self.finished or self.remaining() == 0

    def remaining(self) -> int | None:
        """Output tokens the continuation may make (None: to the end of the context)."""
        return None if self.max_tokens is None else self.max_tokens - len(self.generated)

    def continuation(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The completion that continues the stream, from the original engine `body`."""
        assert self.prompt_ids is not None
        out = {key: body[key] for key in CARRIED if key in body}
        out |= {
            "model": body["model"],
            "prompt": [*self.prompt_ids, *self.generated],
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        if (left := self.remaining()) is not None:
            out["max_tokens"] = left
        if self.min_tokens:
            out["min_tokens"] = max(0, self.min_tokens - len(self.generated))
        return out

    def resume(self, replica: str, *, again: bool = False) -> None:
        """The next chunks come from `replica`: a continuation's, or (`again`: the client got
        no chunk yet) the whole answer's, started again."""
        self.continuing, self.broken, self.done = not again, False, False
        self.replicas.append(replica)

    def _continued(self, event: bytes) -> bytes:
        """A continuation's event, in the original stream's shape."""
        if event == DONE:
            self.done = True
            return b""
        if event.startswith(_ERROR):
            self.broken, self.error_event = True, event + b"\n\n"
            return b""
        if not event.startswith(b"data: "):
            return b""  # its usage comment and any other: the ending says the whole answer's
        try:
            choices = json.loads(event[6:]).get("choices") or []
        except ValueError:
            return b""
        if not choices:
            return b""  # its usage chunk
        choice = choices[0]
        ids = [int(i) for i in choice.get("token_ids") or []]
        self.generated.extend(ids)
        reason = choice.get("finish_reason")
        self.finished = self.finished or reason is not None
        text = choice.get("text") or ""
        if not text and reason is None and not (ids and self.wants_ids):
            return b""
        return self.chunk(text, reason, choice.get("stop_reason"), ids)

    def chunk(
        self, text: str, reason: str | None, stop: Any = None, ids: list[int] | None = None
    ) -> bytes:
        """An event of the original stream's shape carrying `text`."""
        token_ids = ids if self.wants_ids else None
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": reason, "stop_reason": stop}
        if not self.chat:
            choice["prompt_token_ids"] = None
        choice["token_ids"] = token_ids
        return self._event({"choices": [choice]})

    def total_usage(self) -> Usage:
        """The whole answer's (prompt, completion) tokens, as the engines counted them."""
        return Usage(len(self.prompt_ids or ()), len(self.generated))

    def ending(self, private: bool = False) -> bytes:
        """What ends a migrated stream: a last chunk if none said why it finished (its tokens
        ran out at the break), the usage chunk (if asked), the migration's comment (`private`:
        without the replica ids, as the routing headers then are), `[DONE]`."""
        out = b"" if self.finished else self.chunk("", "length")
        if self.wants_usage:
            prompt, completion, _ = self.total_usage()
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}  # fmt: skip
            out += self._event({"choices": [], "usage": usage})
        note = b"%s %d %s %d\n\n" % (
            MIGRATED_COMMENT,
            len(self.replicas) - 1,
            b"-" if private else ",".join(self.replicas).encode(),
            len(self.generated),
        )
        return out + note + DONE + b"\n\n"

    def _event(self, fields: dict[str, Any]) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                 **fields}  # fmt: skip
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def relay_events(
    response: EngineResponse,
    send: Send,
    stream: Stream,
    on_first_byte: Callable[[], None],
    on_usage: Callable[[Usage], None],
) -> None:
    """Copy an engine's SSE answer to the client event by event through `stream.take` (the
    answer's head already sent), until it ends (`stream.done`) or fails (it breaks off, stalls,
    or sends the engine's error event): the caller reads which from `stream`. A stream that
    ends in its own shape (not a continuation's) ends the answer: its last bytes go with
    `more_body` false. The engine's usage is given to `on_usage` before they are sent."""
    pending, first = b"", True
    try:
        async for data in response.chunks():
            if first:
                on_first_byte()
                first = False
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[:cut].split(b"\n\n"), pending[cut + 2 :]
            out = []
            for event in events:
                out.append(stream.take(event))
                if stream.done or stream.broken:
                    break
            last = stream.done and not stream.continuing
            if last and stream.usage is not None:
                on_usage(stream.usage)
            body = b"".join(out)
            if body or last:
                await send({"type": "http.response.body", "body": body, "more_body": not last})
            if stream.done or stream.broken:
                return
    except Stopped:
        pass  # the ingress stopped it (preempted): the caller knows
    except OSError as exc:  # (TimeoutError is one)
        logger.warning("engine stream broke: %s: %s", type(exc).__name__, exc)


def _client_error(event: bytes) -> bool:
    try:
        code = json.loads(event[6:])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(code, int) and 400 <= code < 500


def _id_lists(event: bytes) -> list[tuple[int, int, bool]]:
    """Where the event's `token_ids` and `prompt_token_ids` lists are: (start, end, whether
    the prompt's). A key inside a text is escaped (`\\"`), so never taken for one."""
    found, at = [], event.find(_IDS_KEY)
    while at > 0:
        prompt = event[at - 8 : at] == b'"prompt_'
        if prompt or event[at - 1] == 0x22:  # the key's opening quote
            match = _IDS_LIST.match(event, at + len(_IDS_KEY))
            if match is not None:
                found.append((match.start(1), match.end(1), prompt))
        at = event.find(_IDS_KEY, at + len(_IDS_KEY))
    return found


def _ints(text: bytes) -> list[int]:
    return [int(t) for t in text.split(b",") if t.strip()]
