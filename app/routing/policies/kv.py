"""The `kv` policy: the longest cached prefix as the engines report it (KV cache events)."""

from __future__ import annotations

from collections.abc import Sequence

from app.routing.index import PrefixIndex
from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from app.routing.policies.base import IndexedPolicy, eligible
from app.routing.policies.prefix import best_match
from app.routing.prefix_match import KV_MATCH_REASONS, BlockIndex, match_ratios
from app.routing.tokens import DEFAULT_BLOCK_SIZE, block_hash, root_hash
from app.routing.types import Decision, ReplicaStats, RequestView


class KvPolicy(IndexedPolicy):
    """Longest cached prefix as the engines report it (KV cache events), not as predicted.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Hash the prompt's token blocks as `app.routing.tokens` does.
    3. Look the chain up in the index built from each replica's `BlockStored` / `BlockRemoved` /
       `AllBlocksCleared` events (`on_kv_event`).
    4. As the prefix policy: best match if it covers `min_match` of the prompt, with the fewest
       in-flight plus queued as tie-break (`kv-match=<ratio>`), else least loaded (`least-load`).
    5. Record nothing: only engine events change the index.
    """

    name = "kv"
    index_kind = PrefixIndex  # engine events store and remove parts of chains

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 1_000_000,
        min_match: float = 0.1,
    ) -> None:
        super().__init__(block_size, max_blocks)
        self.min_match = min_match
        self._engine_to_ours: dict[tuple[str, int], int] = {}

    def on_kv_event(self, model: str, replica_id: str, event: KvEvent) -> None:
        """Apply one engine KV cache event from a replica of a model."""
        if isinstance(event, BlockStored):
            self._stored(self.index(model), replica_id, event)
        elif isinstance(event, BlockRemoved):
            gone = [self._engine_to_ours.pop((replica_id, h), None) for h in event.block_hashes]
            self.index(model).remove(replica_id, [h for h in gone if h is not None])
        elif isinstance(event, AllBlocksCleared):
            self.forget_replica(replica_id)

    def _stored(self, index: BlockIndex, replica_id: str, event: BlockStored) -> None:
        """Re-hash the stored blocks from their token ids, chained to their known parent."""
        parent = (
            root_hash(event.lora_name)
            if event.parent_block_hash is None
            else self._engine_to_ours.get((replica_id, event.parent_block_hash))
        )
        if parent is None:  # parent unknown (evicted or missed): this chain cannot match
            return
        ours: list[int] = []
        bs = event.block_size
        for i, engine_hash in enumerate(event.block_hashes):
            parent = block_hash(parent, event.token_ids[i * bs : (i + 1) * bs])
            self._engine_to_ours[(replica_id, engine_hash)] = parent
            ours.append(parent)
        index.insert(replica_id, ours)

    def forget_replica(self, replica_id: str) -> None:
        super().forget_replica(replica_id)
        for key in [k for k in self._engine_to_ours if k[0] == replica_id]:
            del self._engine_to_ours[key]

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        ratios = match_ratios(self.index(request.model), request, pool, self.block_size)
        chosen, reason = best_match(pool, ratios, self.min_match, KV_MATCH_REASONS)
        return self._decide(chosen, reason)
