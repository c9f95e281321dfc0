"""Routing policies: each picks one healthy replica for a request from the candidates' stats."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Sequence

from app.routing.index import ChainIndex, PrefixIndex
from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent
from app.routing.tokens import DEFAULT_BLOCK_SIZE, block_hash, root_hash
from app.routing.types import Decision, NoReplicaError, ReplicaStats, RequestView

# `prefix-match=<ratio>` for the ratios 0.00 to 1.00, indexed by `round(ratio * 100)` (two
# decimals, ties to even): a lookup, as formatting costs ~1 us on the routing hot path.
MATCH_REASONS = [f"prefix-match={i / 100:.2f}" for i in range(101)]


def eligible(request: RequestView, candidates: Sequence[ReplicaStats]) -> list[ReplicaStats]:
    """Healthy candidates; for a LoRA request, those holding the adapter when any do."""
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        raise NoReplicaError(f"no healthy replica for model {request.model!r}")
    if request.lora_adapter:
        holding = [c for c in healthy if request.lora_adapter in c.lora_adapters]
        if holding:
            return holding
    return healthy


def _pending(c: ReplicaStats) -> int:
    return c.in_flight + c.queued


def _stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class _Base:
    """No-op hooks shared by the policies."""

    name = "base"

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """Nothing to do by default."""

    def forget_replica(self, replica_id: str) -> None:
        """Nothing to do by default."""

    def _decide(self, replica: ReplicaStats, reason: str) -> Decision:
        return Decision(replica.replica_id, self.name, reason)


class RoundRobinPolicy(_Base):
    """Rotate through the replicas.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Pick the next one in turn (one counter per model).
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[str, itertools.count] = {}

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        turn = next(self._turn.setdefault(request.model, itertools.count()))
        return self._decide(pool[turn % len(pool)], "round-robin")


class PowerOfTwoPolicy(_Base):
    """Least in-flight of two random replicas.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Sample two at random (seeded); pick the one with fewer in-flight plus queued requests.
    """

    name = "power_of_two"

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        pair = self._rng.sample(pool, 2) if len(pool) > 1 else pool
        return self._decide(min(pair, key=_pending), "least-load")


class SessionPolicy(_Base):
    """Consistent hashing of a session key with bounded load.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Without a session key, fall back to power of two (`no-session-key`).
    3. Hash the key onto a ring of `vnodes` points per replica (blake2b, stable).
    4. Walk the ring clockwise from the key; take the first replica whose in-flight count is
       below `ceil(load_factor * (total in-flight + 1) / replicas)` (`session-affinity` for the
       key's own replica, else `session-spill`).
    """

    name = "session"

    def __init__(self, load_factor: float = 1.25, vnodes: int = 160, seed: int | None = 0) -> None:
        if load_factor < 1:
            raise ValueError("load_factor must be >= 1")
        self.load_factor = load_factor
        self.vnodes = vnodes
        self._fallback = PowerOfTwoPolicy(seed)
        self._fallback.name = self.name
        self._rings: dict[frozenset[str], tuple[list[int], list[str]]] = {}

    def _ring(self, ids: frozenset[str]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) > 64:
                self._rings.clear()
            points = sorted(
                (_stable_hash(f"{rid}#{i}"), rid) for rid in ids for i in range(self.vnodes)
            )
            ring = self._rings[ids] = ([p for p, _ in points], [r for _, r in points])
        return ring

    def owner(self, key: str, replica_ids: Sequence[str]) -> str:
        """The replica a key maps to when no replica is loaded."""
        points, owners = self._ring(frozenset(replica_ids))
        return owners[bisect.bisect(points, _stable_hash(key)) % len(points)]

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        if not request.session_key:
            d = self._fallback.choose(request, pool)
            return Decision(d.replica_id, self.name, "no-session-key")
        by_id = {c.replica_id: c for c in pool}
        points, owners = self._ring(frozenset(by_id))
        total = sum(c.in_flight for c in pool)
        bound = math.ceil(self.load_factor * (total + 1) / len(pool))
        start = bisect.bisect(points, _stable_hash(request.session_key))
        first = owners[start % len(points)]
        seen: set[str] = set()
        for step in range(len(points)):
            rid = owners[(start + step) % len(points)]
            if rid in seen:
                continue
            seen.add(rid)
            if by_id[rid].in_flight < bound:
                reason = "session-affinity" if rid == first else "session-spill"
                return self._decide(by_id[rid], reason)
        return self._decide(by_id[first], "session-affinity")


class PrefixPolicy(_Base):
    """Longest cached prefix, from an index of this policy's own past decisions.

    1. Keep the eligible replicas (healthy; LoRA holders first).
    2. Hash the prompt's full blocks, chained like vLLM (`block_size` tokens a block).
    3. Look the chain up in the model's index (LRU, `max_blocks` per replica).
    4. If the best match covers at least `min_match` of the prompt, pick the best-matching
       replica with the fewest in-flight plus queued requests (`prefix-match=<ratio>`);
       otherwise the least loaded replica (`least-load`).
    5. Record the prompt's blocks under the chosen replica.
    """

    name = "prefix"
    _index_class: type[ChainIndex] | type[PrefixIndex] = ChainIndex  # records whole chains

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 100_000,
        min_match: float = 0.1,
    ) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.min_match = min_match
        self._indexes: dict[str, ChainIndex | PrefixIndex] = {}

    def index(self, model: str) -> ChainIndex | PrefixIndex:
        """The model's prefix index."""
        idx = self._indexes.get(model)
        if idx is None:
            idx = self._indexes[model] = self._index_class(self.max_blocks)
        return idx

    def forget_replica(self, replica_id: str) -> None:
        for idx in self._indexes.values():
            idx.forget_replica(replica_id)

    def _matches(self, request: RequestView, pool: list[ReplicaStats]) -> list[float]:
        """Each replica's share of the prompt in its cached prefix (0 to 1)."""
        hashes = request.block_hashes(self.block_size)
        found = self.index(request.model).match(hashes) if hashes else None
        if not found:
            return [0.0] * len(pool)
        share = self.block_size / max(request.prompt_tokens, 1)  # of the prompt, one block
        ratios = [found.get(c.replica_id, 0) * share for c in pool]
        if len(hashes) * share > 1.0:  # rounding could lift a ratio over 1 (none can be more)
            ratios = [min(1.0, r) for r in ratios]
        return ratios

    def _record(self, request: RequestView, replica_id: str) -> None:
        self.index(request.model).insert(replica_id, request.block_hashes(self.block_size))

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        ratios = self._matches(request, pool)
        best = max(ratios)
        if best > 0 and best >= self.min_match:
            top = [c for c, r in zip(pool, ratios, strict=True) if r == best]
            chosen, reason = min(top, key=_pending), MATCH_REASONS[round(best * 100)]
        else:
            chosen, reason = min(pool, key=_pending), "least-load"
        self._record(request, chosen.replica_id)
        return self._decide(chosen, reason)


class KvPolicy(PrefixPolicy):
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
    _index_class = PrefixIndex  # engine events store and remove parts of chains

    def __init__(
        self, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = 1_000_000, **kw: float
    ) -> None:
        super().__init__(block_size, max_blocks, **kw)
        self._engine_to_ours: dict[tuple[str, int], int] = {}

    def on_kv_event(self, model: str, replica_id: str, event: KvEvent) -> None:
        """Apply one engine KV cache event from a replica of a model."""
        idx = self.index(model)
        if isinstance(event, BlockStored):
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
            idx.insert(replica_id, ours)
        elif isinstance(event, BlockRemoved):
            gone = [self._engine_to_ours.pop((replica_id, h), None) for h in event.block_hashes]
            idx.remove(replica_id, [h for h in gone if h is not None])
        elif isinstance(event, AllBlocksCleared):
            self.forget_replica(replica_id)

    def forget_replica(self, replica_id: str) -> None:
        super().forget_replica(replica_id)
        for key in [k for k in self._engine_to_ours if k[0] == replica_id]:
            del self._engine_to_ours[key]

    def _record(self, request: RequestView, replica_id: str) -> None:
        return None

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        d = super().choose(request, candidates)
        return Decision(d.replica_id, d.policy, d.reason.replace("prefix-match", "kv-match"))
