"""The `kv` policy: the `scored` rule, its prefix signal from the engines' KV cache events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from app.routing.index import PrefixIndex
from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from app.routing.policies.scored import ScoredPolicy
from app.routing.policies.scored_settings import split_settings
from app.routing.prefix_match import KV_MATCH_REASONS, BlockIndex, match_ratios
from app.routing.tokens import DEFAULT_BLOCK_SIZE, block_hash, root_hash
from app.routing.types import ReplicaStats, RequestView


class KvPolicy(ScoredPolicy):
    """The `scored` rule, with each replica's match read from its engine's KV cache events.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
    2. Hotspot guard, as `scored` (step 2).
    3. Score each remaining replica as `scored` does (step 3), with `match` the longer of:
       a. the replica's cached prefix of the prompt as its engine reported it: the index built
          from the replica's `BlockStored` / `BlockRemoved` / `AllBlocksCleared` events
          (`on_kv_event`), LRU-bounded at `max_blocks` per replica;
       b. its in-flight prefix: the longest prefix the prompt shares with a request sent
          there whose blocks the engine has not reported yet (an engine reports a prompt's
          blocks only after its prefill, and a feed takes time): a request is in flight from
          its decision until the engine reports its chain's last block stored, or until it
          completes, whichever comes first.
       A match below `min_match` counts as none.
    4. Pick the highest score; ties go to the fewest in-flight plus queued, then in turn.
    5. Add the request's new blocks to the replica's pressure and outstanding work, and the
       request to its share, as `scored`; record its blocks as in flight there (step 3b),
       unless the engine reported them all already. The index itself changes only with the
       engines' events.
    Reasons: `kv-match=<ratio>` when the chosen replica had a match, `hotspot-guard` when a
    better-matching replica was skipped as a hotspot, else `least-load`. Settings:
    `block_size`, `max_blocks`, `min_match` and the `scored` policy's weights and guard.
    """

    name = "kv"
    index_kind = PrefixIndex  # engine events store and remove parts of chains
    reasons = KV_MATCH_REASONS

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 100_000,
        min_match: float = 0.1,
        **settings: Any,
    ) -> None:
        super().__init__(block_size, max_blocks, *split_settings(settings))
        self.min_match = min_match
        self._engine_to_ours: dict[tuple[str, int], int] = {}
        self._inflight = InFlightBlocks()

    @classmethod
    def from_settings(
        cls, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = 100_000, **settings: Any
    ) -> KvPolicy:
        """A policy from flat keyword settings (as the constructor takes them)."""
        return cls(block_size, max_blocks, **settings)

    def on_kv_event(
        self, model: str, replica_id: str, event: KvEvent, *, router_hashes: bool = False
    ) -> None:
        """Apply one engine KV cache event from a replica of a model.

        `router_hashes`: the event's block hashes are already the router's own chained hashes
        (`app.routing.tokens`; the routing lab's simulated engines publish these): stored blocks
        are indexed and removed ones dropped as they are, with no token ids and no re-hashing.
        Otherwise they are the engine's hashes, mapped to ours through the stored events'
        token ids."""
        if isinstance(event, BlockStored):
            if router_hashes:
                stored = event.block_hashes
                self.index(model).insert(replica_id, stored)
            else:
                stored = self._stored(self.index(model), replica_id, event)
            self._inflight.confirm(model, replica_id, stored)
        elif isinstance(event, BlockRemoved):
            if router_hashes:
                self.index(model).remove(replica_id, event.block_hashes)
                return
            gone = [self._engine_to_ours.pop((replica_id, h), None) for h in event.block_hashes]
            self.index(model).remove(replica_id, [h for h in gone if h is not None])
        elif isinstance(event, AllBlocksCleared):
            self.forget_blocks(replica_id)

    def _stored(self, index: BlockIndex, replica_id: str, event: BlockStored) -> list[int]:
        """Re-hash the stored blocks from their token ids, chained to their known parent, and
        index them; our hashes of them (none for an event without token ids: it cannot be
        re-hashed here and is skipped)."""
        if event.token_ids is None:
            return []
        parent = (
            root_hash(event.lora_name)
            if event.parent_block_hash is None
            else self._engine_to_ours.get((replica_id, event.parent_block_hash))
        )
        if parent is None:  # parent unknown (evicted or missed): this chain cannot match
            return []
        ours: list[int] = []
        bs = event.block_size
        for i, engine_hash in enumerate(event.block_hashes):
            parent = block_hash(parent, event.token_ids[i * bs : (i + 1) * bs])
            self._engine_to_ours[(replica_id, engine_hash)] = parent
            ours.append(parent)
        index.insert(replica_id, ours)
        return ours

    def forget_blocks(self, replica_id: str) -> None:
        """Drop what the replica's engine reported (its cache was cleared, or its feed is
        rebuilding it); its loads and in-flight requests stay."""
        for index in self._indexes.values():
            index.forget_replica(replica_id)
        for key in [k for k in self._engine_to_ours if k[0] == replica_id]:
            del self._engine_to_ours[key]

    def forget_replica(self, replica_id: str) -> None:
        """The replica is gone: its reported blocks, in-flight requests and loads."""
        super().forget_replica(replica_id)
        self.forget_blocks(replica_id)
        self._inflight.forget_replica(replica_id)

    def _record(self, request: RequestView, replica_id: str, hashes: Sequence[int]) -> None:
        """Step 5's record: the prompt's blocks in flight to the replica, unless its engine
        reported them all already."""
        if hashes and replica_id not in self.index(request.model).holders(hashes[-1]):
            self._inflight.add(id(request), request.model, replica_id, hashes)

    def _match(self, request: RequestView, pool: Sequence[ReplicaStats]) -> list[float]:
        """Step 3's `match`: the engine-reported prefix, or the in-flight one if longer."""
        ratios = match_ratios(self.index(request.model), request, pool, self.block_size)
        if self._inflight:
            hashes = request.block_hashes(self.block_size)
            share = self.block_size / max(request.prompt_tokens, 1)
            match = self._inflight.match
            ratios = [
                max(r, min(1.0, match(request.model, c.replica_id, hashes) * share))
                for c, r in zip(pool, ratios, strict=True)
            ]
        floor = self.min_match
        return [r if r >= floor else 0.0 for r in ratios] if floor > 0 else ratios

    def on_first_token(self, request: RequestView, replica_id: str) -> None:
        """The prefill is done: its work is off the replica (its blocks stay in flight until
        the engine reports them or the request completes)."""
        ScoredPolicy.on_complete(self, request, replica_id)

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """The request is done: its work and its in-flight blocks are off the replica."""
        ScoredPolicy.on_complete(self, request, replica_id)
        self._inflight.drop(id(request))


class InFlightBlocks:
    """The blocks of requests sent to replicas that their engines have not reported yet.

    Per (model, replica), a count of the in-flight requests holding each block; a request
    leaves when `drop`ped (its completion) or when its chain's last block is reported stored
    on its replica (`confirm`): from then on the engine's events say whether it is there.
    At most `max_requests` are kept (the oldest go first: completions not reported)."""

    def __init__(self, max_requests: int = 100_000) -> None:
        self.max_requests = max_requests
        self._requests: dict[int, tuple[tuple[str, str], Sequence[int]]] = {}
        self._counts: dict[tuple[str, str], dict[int, int]] = {}
        self._last: dict[tuple[str, str, int], list[int]] = {}  # (model, replica, last) -> keys

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, key: int, model: str, replica_id: str, hashes: Sequence[int]) -> None:
        """Request `key`'s chain is in flight to the replica."""
        self.drop(key)
        where = (model, replica_id)
        counts = self._counts.setdefault(where, {})
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        self._requests[key] = (where, hashes)
        self._last.setdefault((model, replica_id, hashes[-1]), []).append(key)
        if len(self._requests) > self.max_requests:
            self.drop(next(iter(self._requests)))

    def drop(self, key: int) -> None:
        """Request `key` is no longer in flight (nothing if it was not)."""
        found = self._requests.pop(key, None)
        if found is None:
            return
        (model, replica_id), hashes = found
        counts = self._counts[model, replica_id]
        for h in hashes:
            n = counts[h] - 1
            if n:
                counts[h] = n
            else:
                del counts[h]
        waiting = self._last.get((model, replica_id, hashes[-1]))
        if waiting is not None:
            waiting.remove(key)
            if not waiting:
                del self._last[model, replica_id, hashes[-1]]

    def confirm(self, model: str, replica_id: str, stored: Iterable[int]) -> None:
        """The replica's engine stored these blocks: the requests whose chains end in one of
        them are no longer in flight."""
        if not self._last:
            return
        for h in stored:
            waiting = self._last.get((model, replica_id, h))
            if waiting is not None:
                for key in list(waiting):
                    self.drop(key)

    def forget_replica(self, replica_id: str) -> None:
        """Drop the requests in flight to a replica."""
        for key in [k for k, (where, _) in self._requests.items() if where[1] == replica_id]:
            self.drop(key)

    def match(self, model: str, replica_id: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of the chain are in flight to the replica."""
        counts = self._counts.get((model, replica_id))
        if not counts:
            return 0
        n = 0
        for h in hashes:
            if h not in counts:
                break
            n += 1
        return n
