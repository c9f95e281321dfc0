"""Prompt blocks and their chained hashes, as vLLM's prefix cache keys them.

Token ids, when the caller has them, are used as they are. Text is not tokenised: a cheap,
deterministic approximation counts one token per `BYTES_PER_TOKEN` UTF-8 bytes, so a block of
`block_size` tokens is `block_size * BYTES_PER_TOKEN` bytes of the prompt. Like vLLM, only full
blocks are hashed, and each block's hash covers its parent's hash and its own content, so equal
hashes mean equal prefixes (up to 64-bit collisions). All hashes here are stable across
processes (no `str` or `bytes` hashing, whose values are salted per process).

- Token blocks: `hash((parent, tuple_of_token_ids))`, as `block_hash` does for engine KV events.
- Text blocks (cost matters: a 2000-token prompt is 125 blocks) are hashed with a few vectorised
  numpy operations and no Python-level work per block: the prompt's bytes are read as
  little-endian 64-bit words (32-bit when a block is not a multiple of 8 bytes); a block's digest
  is the dot product of its words with fixed odd 64-bit multipliers (mod 2**64), mixed by a
  xor-shift and xor-ed with a fixed per-position constant (the first block's also with the root
  hash); a block's hash is its parent's hash plus its digest (mod 2**64), a cumulative sum.
  Position constants make the chain order-sensitive (two prompts with the same blocks in
  another order differ).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 16
BYTES_PER_TOKEN = 4
_ROOT = 0x5EED
_SEEDS = np.random.default_rng(_ROOT)  # fixed seed: the same constants in every process
_MULTIPLIERS = _SEEDS.integers(0, 2**63, size=4096, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_POSITIONS = _SEEDS.integers(0, 2**63, size=1 << 16, dtype=np.uint64) * np.uint64(2)
_POSITIONS[0] ^= np.uint64(_ROOT)  # mixes the default root into every first block's digest
_SHIFT = np.uint64(29)
_MASK = 2**64 - 1
_U8, _U4 = np.dtype("<u8"), np.dtype("<u4")


def approx_tokens(text: str) -> int:
    """The approximate token count of a text (UTF-8 bytes / BYTES_PER_TOKEN, rounded up)."""
    size = len(text) if text.isascii() else len(text.encode())
    return -(-size // BYTES_PER_TOKEN)


def root_hash(lora_adapter: str | None = None) -> int:
    """The parent hash of a prompt's first block; a LoRA adapter gets its own tree."""
    return _ROOT if not lora_adapter else hash((_ROOT, zlib.crc32(lora_adapter.encode())))


def text_chain(data: bytes, step: int, root: int) -> list[int]:
    """Chained hashes of the full `step`-byte blocks of UTF-8 `data` (see the module doc)."""
    n = len(data) // step
    if not n:
        return []
    wide = step % 8 == 0
    per_block = step // (8 if wide else 4)
    if per_block > len(_MULTIPLIERS):
        raise ValueError(f"block of {step} bytes is too large (at most {4 * len(_MULTIPLIERS)})")
    words = np.frombuffer(data, dtype=_U8 if wide else _U4, count=n * per_block)
    if not wide:
        words = words.astype(np.uint64)
    digests = np.dot(words.reshape(n, per_block), _MULTIPLIERS[:per_block])
    digests ^= digests >> _SHIFT
    if n > len(_POSITIONS):
        digests ^= np.resize(_POSITIONS, n) ^ np.arange(n, dtype=np.uint64)
    else:
        digests ^= _POSITIONS[:n]
    if root != _ROOT:  # the default root is mixed in by _POSITIONS[0]
        first = digests[:1]
        first ^= np.uint64((root ^ _ROOT) & _MASK)
    return np.add.accumulate(digests, out=digests).tolist()


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
