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
  little-endian 32-bit words, each multiplied by a fixed odd 64-bit constant for its position
  in the prompt (mod 2**64; a change in a word moves the product's bits from the change up, so
  two changes cancel with odds of about 2**-40); a block's hash is the running sum of these
  products up to its last word (mod 2**64; a LoRA adapter's root hash is added to the first):
  its parent's hash plus its own words' products. Position constants make the chain
  order-sensitive (two prompts with the same blocks in another order differ); they repeat
  after `_WORDS` words (512 KiB of prompt). The hashes come as an `array("Q")`: 8 bytes a
  block, and a Python int only when read.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 16
BYTES_PER_TOKEN = 4
_ROOT = 0x5EED
_SEEDS = np.random.default_rng(_ROOT)  # fixed seed: the same constants in every process
_WORDS = 1 << 17
_MULTIPLIERS = _SEEDS.integers(0, 2**63, size=_WORDS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_MASK = 2**64 - 1
_U4 = np.dtype("<u4")


def approx_tokens(text: str) -> int:
    """The approximate token count of a text (UTF-8 bytes / BYTES_PER_TOKEN, rounded up)."""
    size = len(text) if text.isascii() else len(text.encode(errors="surrogatepass"))
    return -(-size // BYTES_PER_TOKEN)


def root_hash(lora_adapter: str | None = None) -> int:
    """The parent hash of a prompt's first block; a LoRA adapter gets its own tree."""
    return _ROOT if not lora_adapter else hash((_ROOT, zlib.crc32(lora_adapter.encode())))


def text_chain(data: bytes, step: int, root: int) -> array:
    """Chained hashes of the full `step`-byte blocks of UTF-8 `data` (see the module doc);
    `step` is a multiple of 4 (`BYTES_PER_TOKEN` bytes a token)."""
    per_block = step // 4
    count = len(data) // step * per_block
    if not count:
        return array("Q")
    multipliers = _MULTIPLIERS[:count] if count <= _WORDS else np.resize(_MULTIPLIERS, count)
    mixed = np.frombuffer(data, dtype=_U4, count=count) * multipliers  # uint64
    if root != _ROOT:
        mixed[:1] += np.uint64((root - _ROOT) & _MASK)  # an array op: wraps mod 2**64
    np.add.accumulate(mixed, out=mixed)
    return array("Q", mixed[per_block - 1 :: per_block].tobytes())


def chain_hashes(
    source: str | Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE, lora: str | None = None
) -> Sequence[int]:
    """Hashes of the full blocks of a text or token-id sequence, each chained to its parent."""
    parent = root_hash(lora) if lora else _ROOT
    if isinstance(source, str):
        data = source.encode(errors="surrogatepass")  # handle calls skip the ingress's checks
        return text_chain(data, block_size * BYTES_PER_TOKEN, parent)
    out: list[int] = []
    tokens = tuple(source)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tokens[start : start + block_size]))
        out.append(parent)
    return out


def block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of one token block given its parent's hash (for engine KV events)."""
    return hash((parent, tuple(token_ids)))
