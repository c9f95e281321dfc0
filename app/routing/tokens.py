"""Prompt blocks and their chained hashes, as vLLM's prefix cache keys them.

Token ids, when the caller has them, are used as they are. Text is not tokenised: a cheap,
deterministic approximation counts one token per `BYTES_PER_TOKEN` UTF-8 bytes, so a block of
`block_size` tokens is `block_size * BYTES_PER_TOKEN` bytes of the prompt. Like vLLM, only full
blocks are hashed, and each block's hash covers its parent's hash and its own content, so equal
hashes mean equal prefixes. All hashes here are stable across processes (no `str` hashing).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 16
BYTES_PER_TOKEN = 4
_ROOT = 0x5EED


def approx_tokens(text: str) -> int:
    """The approximate token count of a text (UTF-8 bytes / BYTES_PER_TOKEN, rounded up)."""
    return -(-len(text.encode()) // BYTES_PER_TOKEN)


def root_hash(lora_adapter: str | None = None) -> int:
    """The parent hash of a prompt's first block; a LoRA adapter gets its own tree."""
    return _ROOT if not lora_adapter else hash((_ROOT, zlib.crc32(lora_adapter.encode())))


def chain_hashes(
    source: str | Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, lora: str | None = None
) -> list[int]:
    """Hashes of the full blocks of a text or token-id sequence, each chained to its parent."""
    parent = root_hash(lora)
    out: list[int] = []
    if isinstance(source, str):
        data = source.encode()
        step = block_size * BYTES_PER_TOKEN
        digests = map(
            zlib.crc32, [data[i : i + step] for i in range(0, len(data) - step + 1, step)]
        )
        for d in digests:
            parent = hash((parent, d))
            out.append(parent)
    else:
        tokens = tuple(source)
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tokens[start : start + block_size]))
            out.append(parent)
    return out


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of one token block given its parent's hash (for engine KV events)."""
    return hash((parent, tuple(token_ids)))
