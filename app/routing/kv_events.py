"""Engine KV cache events (the shape of vLLM's `BlockStored` / `BlockRemoved` / cleared events).

The engine's own block hashes are opaque here: a stored event carries the blocks' token ids, and
the `kv` policy re-hashes them with `app.routing.tokens` so engine-reported blocks and request
prompts meet in one hash space. Only token-id prompts can match engine blocks exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """The engine cached these consecutive blocks; `parent_block_hash` precedes the first."""

    block_hashes: Sequence[int]
    parent_block_hash: int | None
    token_ids: Sequence[int]
    block_size: int
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """The engine evicted these blocks."""

    block_hashes: Sequence[int]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared
