"""Trace files: JSONL, one request a line.

Each line is `{"t": seconds, "model": str, "session": str | null, "max_tokens": int}` plus exactly
one prompt field: `"prompt": str`, `"messages": [{"role", "content"}, ...]` (rendered as
`role: content` lines, as `app.routing.render_messages` renders a request body's messages),
`"tokens": [int, ...]`, or `"blocks": [hex, ...]`: the prompt as the router's chained block
hashes (`app.routing.tokens`, 16 hex digits each) and no text, with `"prompt_tokens": int` (its
length as the router reads it) and `"block_size": int` (tokens a block, default 16); what
`vrstack capture` records unless told to keep the text. Optional: `"tenant": str` and
`"priority": int` (lower is served first), read by the tenants scenario's admission rules
(`app.lab.tenants`); `"output_tokens": int` (the tokens the answer had: the lab decodes that many
instead of `max_tokens`) and `"endpoint": str` (`completions` or `chat`), written by capture.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.routing import DEFAULT_BLOCK_SIZE, RequestView, render_messages, view_of_body
from app.routing.tokens import BYTES_PER_TOKEN

PROMPT_FIELDS = ("prompt", "messages", "tokens", "blocks")
HASH_MASK = 2**64 - 1
# Token ids made from block hashes: 3-digit numbers, so a prompt of them read as text is 4 bytes
# a token (the routing layer's approximation): the same blocks for every router and simulator.
SYNTH_LOW, SYNTH_IDS = 100, 900
DEFAULT_MAX_TOKENS = 64


@dataclass(slots=True)
class BlockView(RequestView):
    """The routing view of a prompt known only by its chained block hashes (a blocks line).

    Coarser block sizes (multiples of `block_size`) are every k-th hash: a chained hash covers
    its whole prefix. Byte chunks (the peers' character trees) are made from the block holding
    each chunk's end, so two prompts share a chunk only when they share that block."""

    blocks: Sequence[int] = ()
    block_size: int = DEFAULT_BLOCK_SIZE

    def block_hashes(self, block_size: int = DEFAULT_BLOCK_SIZE) -> Sequence[int]:
        k, rest = divmod(block_size, self.block_size)
        if rest or not k:
            raise ValueError(
                f"a trace of {self.block_size}-token blocks replays only with a block size that "
                f"is a multiple of it (got {block_size})"
            )
        return self.blocks if k == 1 else self.blocks[k - 1 :: k]

    def chunk_hashes(self, chunk: int) -> list[int]:
        """Chained hashes of the prompt's full `chunk`-byte pieces, at block granularity."""
        per_block = self.block_size * BYTES_PER_TOKEN
        count = len(self.blocks) * per_block // chunk
        return [hash((self.blocks[((j + 1) * chunk - 1) // per_block], j)) for j in range(count)]

    @property
    def text_bytes(self) -> int:
        """The prompt's approximate size in bytes (`BYTES_PER_TOKEN` a token)."""
        return max(1, self.prompt_tokens * BYTES_PER_TOKEN)


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace."""

    t: float
    model: str
    prompt: str | None = None
    tokens: list[int] | None = None
    session: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    tenant: str | None = None
    priority: int = 0
    messages: list[Any] | None = None  # kept as given; `prompt` holds them rendered
    blocks: Sequence[int] | None = None  # chained block hashes (unsigned 64-bit)
    block_size: int = DEFAULT_BLOCK_SIZE
    prompt_tokens: int | None = None  # with `blocks`: the prompt's length as the router reads it
    output_tokens: int | None = None
    endpoint: str | None = None

    @property
    def decode_tokens(self) -> int:
        """Output tokens to simulate: the answer's when known, else `max_tokens`."""
        return self.output_tokens if self.output_tokens is not None else self.max_tokens

    def replay_prompt(self) -> str | list[int]:
        """The prompt to send: its text or token ids; a blocks line's as token ids made from its
        hashes (`block_token_ids`)."""
        if self.tokens is not None:
            return self.tokens
        if self.prompt is not None:
            return self.prompt
        tokens = self.prompt_tokens or len(self.blocks or ()) * self.block_size
        return block_token_ids(self.blocks or (), self.block_size, tokens)

    def body(self) -> dict[str, Any]:
        """This request as an OpenAI completions body (the session as `user`)."""
        return {
            "model": self.model,
            "prompt": self.replay_prompt(),
            "user": self.session,
            "max_tokens": self.max_tokens,
        }

    def view(self) -> RequestView:
        """The routing view of this request (of its body, as a router reads it)."""
        if self.tokens is None and self.prompt is None and self.blocks is not None:
            length = self.prompt_tokens
            if length is None:
                length = len(self.blocks) * self.block_size
            return BlockView(
                self.model,
                session_key=self.session or None,
                _length=length,
                blocks=self.blocks,
                block_size=self.block_size,
            )
        return view_of_body(self.body(), model=self.model)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "model": self.model, "session": self.session}
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint
        out.update(self._prompt_json())
        out["max_tokens"] = self.max_tokens
        if self.output_tokens is not None:
            out["output_tokens"] = self.output_tokens
        if self.tenant is not None:
            out["tenant"] = self.tenant
        if self.priority:
            out["priority"] = self.priority
        return out

    def _prompt_json(self) -> dict[str, Any]:
        if self.tokens is not None:
            return {"tokens": self.tokens}
        if self.messages is not None:
            return {"messages": self.messages}
        if self.prompt is not None or self.blocks is None:
            return {"prompt": self.prompt or ""}
        length = self.prompt_tokens
        return {
            "blocks": [f"{h & HASH_MASK:016x}" for h in self.blocks],
            "block_size": self.block_size,
            "prompt_tokens": length if length is not None else len(self.blocks) * self.block_size,
        }


def block_token_ids(blocks: Sequence[int], block_size: int, prompt_tokens: int) -> list[int]:
    """Token ids standing for a prompt known by its block hashes: each hash gives the same
    `block_size` ids wherever it comes (so prompts sharing blocks share those ids, and nothing
    else), then the ids past the last full block, made from it and their count."""
    out: list[int] = []
    for h in blocks:
        out += _ids_of(h & HASH_MASK, block_size, 0)
    tail = prompt_tokens - len(out)
    if tail > 0:
        out += _ids_of(blocks[-1] & HASH_MASK if blocks else 0, tail, tail)
    return out


def _ids_of(key: int, count: int, salt: int) -> list[int]:
    """`count` ids in [SYNTH_LOW, SYNTH_LOW + SYNTH_IDS) from a 64-bit key (stable: BLAKE2b)."""
    seed = key.to_bytes(8, "little") + salt.to_bytes(8, "little")
    data = b"".join(
        hashlib.blake2b(seed + i.to_bytes(4, "little"), digest_size=64).digest()
        for i in range(-(-count // 32))  # 32 ids a digest, 2 bytes each
    )
    pairs = (int.from_bytes(data[j : j + 2], "little") for j in range(0, 2 * count, 2))
    return [SYNTH_LOW + v % SYNTH_IDS for v in pairs]


def parse_line(line: str, lineno: int = 0) -> TraceRequest:
    """One trace line; ValueError naming the line and the problem."""
    try:
        obj = json.loads(line)
        prompts = [k for k in PROMPT_FIELDS if k in obj]
        if len(prompts) != 1:
            raise ValueError(f"needs exactly one of {', '.join(PROMPT_FIELDS)}")
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if messages is not None:
            if not isinstance(messages, list):
                raise ValueError("messages must be a list")
            prompt = render_messages(messages)
        tokens = [int(x) for x in obj["tokens"]] if "tokens" in obj else None
        blocks = [int(h, 16) for h in obj["blocks"]] if "blocks" in obj else None
        block_size = int(obj.get("block_size", DEFAULT_BLOCK_SIZE))
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        output = obj.get("output_tokens")
        length = obj.get("prompt_tokens")
        return TraceRequest(
            t=float(obj["t"]),
            model=str(obj.get("model", "default")),
            prompt=prompt,
            tokens=tokens,
            session=obj.get("session"),
            max_tokens=int(obj.get("max_tokens", DEFAULT_MAX_TOKENS)),
            tenant=obj.get("tenant"),
            priority=int(obj.get("priority", 0)),
            messages=messages,
            blocks=blocks,
            block_size=block_size,
            prompt_tokens=int(length) if length is not None else None,
            output_tokens=int(output) if output is not None else None,
            endpoint=obj.get("endpoint"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"trace line {lineno}: {exc}") from None


def read_trace(path: str | Path) -> list[TraceRequest]:
    """A trace file's requests, sorted by time."""
    with open(path, encoding="utf-8") as f:
        reqs = [parse_line(line, i) for i, line in enumerate(f, 1) if line.strip()]
    return sorted(reqs, key=lambda r: r.t)


def trace_lines(requests: Iterable[TraceRequest]) -> Iterable[str]:
    """Each request as one JSONL line (with its newline)."""
    for r in requests:
        yield json.dumps(r.to_json(), separators=(",", ":")) + "\n"


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(trace_lines(requests))
