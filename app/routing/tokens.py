"""Prompt blocks and their chained hashes, as vLLM's prefix cache keys them.

Token ids, when the caller has them, are used as they are. Text is not tokenised: a cheap,
deterministic approximation counts one token per `BYTES_PER_TOKEN` UTF-8 bytes, so a block of
`block_size` tokens is `block_size * BYTES_PER_TOKEN` bytes of the prompt. Like vLLM, only full
blocks are hashed, and each block's hash covers its parent's hash and its own content, so equal
hashes mean equal prefixes. All hashes here are stable across processes (no `str` or `bytes`
hashing, whose values are salted per process).

- Token blocks: `hash((parent, tuple_of_token_ids))`, as `block_hash` does for engine KV events.
- Text blocks (cost matters: a 2000-token prompt is 125 blocks): the prompt is encoded once and
  read as little-endian 8-byte words in one `struct` call (4-byte words when a block is not a
  multiple of 8 bytes); a block's digest is Python's tuple hash of (its position, its words)
  (deterministic for ints) or, for blocks over 64 bytes, of (its position, its crc32); a block's
  hash is its parent's hash plus its digest (an additive chain), computed with C-level
  iterators, with no Python-level loop per block. The chains of recent texts of 16 blocks or
  more are kept by their first block (bounded in bytes), so a text that extends or shares a
  prefix with a recent one (a system prompt, the previous round of a conversation) reuses those
  hashes and hashes only its new blocks. The result is the same as hashing from scratch.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from itertools import accumulate, count
from operator import add

DEFAULT_BLOCK_SIZE = 16
BYTES_PER_TOKEN = 4
_ROOT = 0x5EED
_SPLITTERS: dict[tuple[int, int], struct.Struct] = {}
_RECENT: dict[tuple[int, int, bytes], tuple[bytes, list[int]]] = {}
_RECENT_MAX_BYTES = 16 << 20
_RECENT_MIN_BLOCKS = 16  # shorter texts are hashed from scratch (cheaper than the look-up)
_MAX_WORDS_STEP = 64
_recent_bytes = 0


def approx_tokens(text: str) -> int:
    """The approximate token count of a text (UTF-8 bytes / BYTES_PER_TOKEN, rounded up)."""
    size = len(text) if text.isascii() else len(text.encode())
    return -(-size // BYTES_PER_TOKEN)


def root_hash(lora_adapter: str | None = None) -> int:
    """The parent hash of a prompt's first block; a LoRA adapter gets its own tree."""
    return _ROOT if not lora_adapter else hash((_ROOT, zlib.crc32(lora_adapter.encode())))


def _blocks(data: bytes, step: int) -> tuple[bytes, ...]:
    """The full `step`-byte blocks of `data`, cut by one cached `struct` call."""
    n = len(data) // step
    splitter = _SPLITTERS.get((n, -step))
    if splitter is None:
        if len(_SPLITTERS) >= 512:
            _SPLITTERS.clear()
        splitter = _SPLITTERS[(n, -step)] = struct.Struct(f"{step}s" * n)
    return splitter.unpack_from(data)


def _word_size(step: int) -> int:
    """The integer width a `step`-byte block is read in: 8 bytes, else 4, else 1."""
    return 8 if step % 8 == 0 else 4 if step % 4 == 0 else 1


def _words(data: bytes, step: int) -> tuple[int, ...]:
    """The full `step`-byte blocks of `data` as little-endian integers (`_word_size` bytes
    each), in one cached `struct` call."""
    size = _word_size(step)
    total = len(data) // step * (step // size)
    splitter = _SPLITTERS.get((total, size))
    if splitter is None:
        if len(_SPLITTERS) >= 512:
            _SPLITTERS.clear()
        code = {8: "Q", 4: "I", 1: "B"}[size]
        splitter = _SPLITTERS[(total, size)] = struct.Struct(f"<{total}{code}")
    return splitter.unpack_from(data)


def _chain(data: bytes, step: int, start: int, parent: int) -> list[int]:
    """Chained hashes of the full blocks of `data`, the first at block position `start`."""
    if step > _MAX_WORDS_STEP:  # long blocks: one crc32 call each is cheaper than their words
        digests = map(zlib.crc32, _blocks(data, step))
        chain = accumulate(map(hash, zip(count(start), digests)), add, initial=parent)
    else:
        words = iter(_words(data, step))
        per_block = step // _word_size(step)
        chain = accumulate(map(hash, zip(count(start), *[words] * per_block)), add, initial=parent)
    next(chain)
    return list(chain)


def _common_blocks(data: bytes, old: bytes, step: int, limit: int) -> int:
    """How many leading `step`-byte blocks two texts share (at least 1, at most `limit`)."""
    view = memoryview(old)
    if data.startswith(view[: limit * step]):
        return limit
    lo, hi = 1, limit - 1  # block 0 is shared (the caller's key); block `limit` is not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if data.startswith(view[: mid * step]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def text_chain(data: bytes, step: int, root: int) -> list[int]:
    """Chained hashes of the full `step`-byte blocks of UTF-8 `data` (see the module doc)."""
    global _recent_bytes
    n = len(data) // step
    if n < _RECENT_MIN_BLOCKS:
        return _chain(data, step, 0, root) if n else []
    key = (step, root, data[:step])
    recent = _RECENT.pop(key, None)
    if recent is None:
        out = _chain(data, step, 0, root)
    else:
        _recent_bytes -= len(recent[0])
        old_data, old = recent
        done = _common_blocks(data, old_data, step, min(n, len(old)))
        out = old[:done]
        if done < n:
            out += _chain(data[done * step :], step, done, out[-1])
    _RECENT[key] = (data, out)
    _recent_bytes += len(data)
    while _recent_bytes > _RECENT_MAX_BYTES and len(_RECENT) > 1:
        _recent_bytes -= len(_RECENT.pop(next(iter(_RECENT)))[0])
    return out


def chain_hashes(
    source: str | Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, lora: str | None = None
) -> list[int]:
    """Hashes of the full blocks of a text or token-id sequence, each chained to its parent."""
    parent = root_hash(lora)
    if isinstance(source, str):
        return text_chain(source.encode(), block_size * BYTES_PER_TOKEN, parent)
    out: list[int] = []
    tokens = tuple(source)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tokens[start : start + block_size]))
        out.append(parent)
    return out


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of one token block given its parent's hash (for engine KV events)."""
    return hash((parent, tuple(token_ids)))
