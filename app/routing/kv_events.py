"""Engine KV cache events (the shape of vLLM's `BlockStored` / `BlockRemoved` / cleared events).

The engine's own block hashes are opaque here: a stored event carries the blocks' token ids, and
the `kv` policy re-hashes them with `app.routing.tokens` so engine-reported blocks and request
prompts meet in one hash space. Only token-id prompts can match engine blocks exactly.

A feed may also publish blocks already in the router's hash space (the chained hashes of
`app.routing.tokens`, as the routing lab's simulated engines do): `KvPolicy.on_kv_event(...,
router_hashes=True)` takes their hashes as they are, and a stored event then needs no token ids
(`token_ids=None`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """The engine cached these consecutive blocks; `parent_block_hash` precedes the first.

    `token_ids` are the blocks' tokens (`block_size` a block), or None when `block_hashes` are
    already the router's own chained hashes (a router-hash feed: nothing to re-hash)."""

    block_hashes: Sequence[int]
    parent_block_hash: int | None
    token_ids: Sequence[int] | None
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
