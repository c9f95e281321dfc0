"""Peer routers, re-implemented here from their documented rules for the lab comparison.

These are simplified re-implementations written from each project's published description (no
code copied); they run against the same simulated replicas as our policies. Character trees are
approximated by chained hashes of fixed-size character chunks (`chunk` below), which matches a
tree's longest common prefix to within one chunk.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from collections.abc import Sequence

from app.lab.trace import BlockView
from app.routing import Decision, PrefixIndex, ReplicaStats, RequestView
from app.routing.policies import PolicyBase, eligible, pending


def char_chunk_hashes(view: RequestView, chunk: int) -> list[int]:
    """Chained hashes of the prompt's full `chunk`-byte pieces (token ids as decimal text; a
    prompt known only by its blocks, at block granularity: `BlockView.chunk_hashes`)."""
    cache_key = -chunk  # negative keys: character chunks, apart from token-block hashes
    hashes = view._hashes.get(cache_key)
    if hashes is None:
        if isinstance(view, BlockView):
            hashes = view.chunk_hashes(chunk)
        else:
            hashes = _text_chunks(view, chunk)
        view._hashes[cache_key] = hashes
    return list(hashes)  # type: ignore[arg-type]


def _text_chunks(view: RequestView, chunk: int) -> list[int]:
    text = view.text if view.text is not None else " ".join(map(str, view.token_ids or ()))
    data = memoryview(text.encode())
    parent = 0x7EE
    hashes = []
    for start in range(0, len(data) - chunk + 1, chunk):
        parent = hash((parent, zlib.crc32(data[start : start + chunk])))
        hashes.append(parent)
    return hashes


def _text_len(view: RequestView) -> int:
    if isinstance(view, BlockView):
        return view.text_bytes
    if view.text is not None:
        return max(1, len(view.text.encode()))
    return max(1, len(" ".join(map(str, view.token_ids or ()))))


class _Peer(PolicyBase):
    """A peer router's shared parts: a character-chunk index, a seeded random source, and the
    `Policy` protocol's no-op hooks (`on_first_token`, `on_complete`)."""

    name = "peer"

    def __init__(self, chunk: int, max_chunks: int, seed: int | None = 0) -> None:
        self.chunk = chunk
        self.rng = random.Random(seed)
        self.index = PrefixIndex(max_chunks)

    def forget_replica(self, replica_id: str) -> None:
        self.index.forget_replica(replica_id)

    def _match(self, view: RequestView, pool: list[ReplicaStats]) -> tuple[list[int], list[int]]:
        hashes = char_chunk_hashes(view, self.chunk)
        found = self.index.match(hashes)
        return hashes, [found.get(c.replica_id, 0) for c in pool]

    def _p2c(self, pool: list[ReplicaStats]) -> ReplicaStats:
        pair = self.rng.sample(pool, 2) if len(pool) > 1 else pool
        return min(pair, key=pending)


class ProductionStackPrefixAware(_Peer):
    """production-stack `prefixaware`, re-implemented from its description.

    1. Hash the prompt in 128-character chunks into a trie (never evicted).
    2. Take the endpoints sharing the longest matched prefix (all endpoints if none match).
    3. Pick one of them at random (load is not considered); record the prompt under it.
    """

    name = "ps-prefixaware"

    def __init__(self, seed: int | None = 0) -> None:
        super().__init__(128, 10**12, seed)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        hashes, m = self._match(request, pool)
        best = max(m)
        chosen = self.rng.choice([c for c, n in zip(pool, m, strict=True) if n == best])
        self.index.insert(chosen.replica_id, hashes)
        return Decision(chosen.replica_id, self.name, "prefix-match" if best else "random")


class RayPrefixCacheAffinity(_Peer):
    """Ray Serve LLM `PrefixCacheAffinityRouter`, re-implemented from its documentation.

    1. If the queue lengths' spread (max - min) exceeds `imbalanced_threshold`, power of two.
    2. Else match the prompt in a per-replica character tree (LRU-evicted above
       `eviction_chars`); if the best match rate is >= `match_rate_threshold` (0.1), keep the
       best-matching replicas, otherwise the replicas with the smallest trees.
    3. Power of two among those kept; record the prompt under the chosen replica.
    Ray's newest default for the threshold is effectively infinite; 10 gives it a load gate.
    """

    name = "ray-prefix-affinity"

    def __init__(
        self,
        imbalanced_threshold: float = 10,
        match_rate_threshold: float = 0.1,
        eviction_chars: int = 400_000,
        seed: int | None = 0,
    ) -> None:
        super().__init__(16, eviction_chars // 16, seed)
        self.imbalanced_threshold = imbalanced_threshold
        self.match_rate_threshold = match_rate_threshold

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        hashes, m = self._match(request, pool)
        loads = [pending(c) for c in pool]
        if max(loads) - min(loads) > self.imbalanced_threshold:
            chosen, reason = self._p2c(pool), "imbalanced"
        else:
            rate = max(m) * self.chunk / _text_len(request)
            if rate >= self.match_rate_threshold:
                kept = [c for c, n in zip(pool, m, strict=True) if n == max(m)]
                reason = "prefix-match"
            else:
                sizes = [self.index.size(c.replica_id) for c in pool]
                kept = [c for c, s in zip(pool, sizes, strict=True) if s == min(sizes)]
                reason = "smallest-tree"
            chosen = self._p2c(kept)
        self.index.insert(chosen.replica_id, hashes)
        return Decision(chosen.replica_id, self.name, reason)


class SglangCacheAware(_Peer):
    """SGLang / vLLM Router `cache_aware`, re-implemented from its documentation.

    1. If max load - min load > `balance_abs` (32) and max load > min load * `balance_rel`
       (1.5), pick the least loaded replica.
    2. Else match the prompt in an approximate radix tree of characters per replica; if the
       match rate exceeds `cache_threshold` (0.3), pick the best-matching replica, else the
       replica with the smallest tree.
    3. Record the prompt under the chosen replica (trees LRU-evicted above `max_tree_chars`).
    """

    name = "sglang-cache-aware"

    def __init__(
        self,
        balance_abs: float = 32,
        balance_rel: float = 1.5,
        cache_threshold: float = 0.3,
        max_tree_chars: int = 2**24,
        seed: int | None = 0,
    ) -> None:
        super().__init__(8, max_tree_chars // 8, seed)
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self.cache_threshold = cache_threshold

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        hashes, m = self._match(request, pool)
        loads = [pending(c) for c in pool]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            chosen, reason = pool[loads.index(lo)], "imbalanced"
        elif max(m) * self.chunk / _text_len(request) > self.cache_threshold:
            chosen, reason = pool[m.index(max(m))], "prefix-match"
        else:
            sizes = [self.index.size(c.replica_id) for c in pool]
            chosen, reason = pool[sizes.index(min(sizes))], "smallest-tree"
        self.index.insert(chosen.replica_id, hashes)
        return Decision(chosen.replica_id, self.name, reason)


class LlmdScorers(_Peer):
    """llm-d's inference scheduler scoring profile, re-implemented from its documentation.

    1. Queue scorer (weight 2): 1 for the shortest queue down to 0 for the longest.
    2. KV-cache utilisation scorer (weight 2): 1 - KV usage.
    3. Prefix-cache scorer (weight 3): share of the prompt's 64-character blocks found in the
       replica's approximate index (LRU, `lru_blocks` per replica).
    4. Pick the highest weighted sum (random among ties); record the prompt under it.
    """

    name = "llmd-scorers"

    def __init__(self, lru_blocks: int = 31_250, seed: int | None = 0) -> None:
        super().__init__(64, lru_blocks, seed)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        hashes, m = self._match(request, pool)
        q = [pending(c) for c in pool]
        spread = max(q) - min(q)
        total = max(1, len(hashes))
        scores = [
            2 * ((max(q) - qi) / spread if spread else 1.0) + 2 * (1 - c.kv_usage) + 3 * n / total
            for c, qi, n in zip(pool, q, m, strict=True)
        ]
        best = max(scores)
        chosen = self.rng.choice([c for c, s in zip(pool, scores, strict=True) if s == best])
        self.index.insert(chosen.replica_id, hashes)
        return Decision(chosen.replica_id, self.name, "scored")


# Routers only: `AibrixVtcBasic` needs each request's tenant and is used by `app.lab.tenants`.
PEERS: dict[str, type] = {
    cls.name: cls
    for cls in (ProductionStackPrefixAware, RayPrefixCacheAffinity, SglangCacheAware, LlmdScorers)
}


class VtcTokenTracker:
    """Each user's weighted tokens (input x `input_weight` + output x `output_weight`) within a
    sliding window of `window_s` seconds, as AIBrix's VTC token tracker keeps them. `now` is the
    time of the latest `add` (the lab sets it in simulated time)."""

    def __init__(
        self, window_s: float = 300.0, input_weight: float = 1.0, output_weight: float = 2.0
    ) -> None:
        self.window_s = window_s
        self.input_weight, self.output_weight = input_weight, output_weight
        self.now = 0.0
        self._events: dict[str, deque[tuple[float, float]]] = {}
        self._sums: dict[str, float] = {}

    def add(self, user: str, input_tokens: int, output_tokens: int, now: float) -> None:
        """Count a request's tokens for `user` at time `now`."""
        self.now = max(self.now, now)
        units = input_tokens * self.input_weight + output_tokens * self.output_weight
        self._events.setdefault(user, deque()).append((now, units))
        self._sums[user] = self._sums.get(user, 0.0) + units

    def tokens(self, user: str) -> float:
        """`user`'s weighted tokens within the window ending at `now`."""
        events = self._events.get(user)
        while events and events[0][0] < self.now - self.window_s:
            self._sums[user] -= events.popleft()[1]
        return self._sums.get(user, 0.0)

    def users(self) -> list[str]:
        return list(self._events)


class AibrixVtcBasic(PolicyBase):
    """AIBrix `vtc-basic`, re-implemented from its documentation: a router, not a queue.

    1. Without a user (the request's `user`), pick a replica at random.
    2. Fairness score: the user's windowed weighted tokens, normalised linearly between the
       smallest and largest user's (range at least `min_tokens`), picks a target replica index
       (clamped to the replicas); a replica's score is its distance from that index / (n - 1).
    3. Utilisation score: the replica's in-flight plus queued requests / `max_pod_load`.
    4. Pick the replica with the lowest `fairness_weight * fairness + utilization_weight *
       utilisation`; the engines then serve FCFS.
    The documentation leaves the normalisation's details open ("adaptive clamped linear"); the
    reading above is ours.
    """

    name = "aibrix-vtc-basic"

    def __init__(
        self,
        tracker: VtcTokenTracker | None = None,
        min_tokens: float = 1000.0,
        max_pod_load: float = 100.0,
        fairness_weight: float = 1.0,
        utilization_weight: float = 1.0,
        seed: int | None = 0,
    ) -> None:
        self.tracker = tracker or VtcTokenTracker()
        self.min_tokens, self.max_pod_load = min_tokens, max_pod_load
        self.fairness_weight, self.utilization_weight = fairness_weight, utilization_weight
        self.rng = random.Random(seed)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        user = request.session_key
        if not user:
            return self._decide(self.rng.choice(pool), "random")
        counts = [self.tracker.tokens(u) for u in self.tracker.users()] or [0.0]
        low, high = min(counts), max(counts)
        norm = (self.tracker.tokens(user) - low) / max(high - low, self.min_tokens)
        last = len(pool) - 1
        target = min(last, max(0, round(min(1.0, norm) * last)))
        scores = [
            self.fairness_weight * (abs(i - target) / last if last else 0.0)
            + self.utilization_weight * pending(c) / self.max_pod_load
            for i, c in enumerate(pool)
        ]
        return self._decide(pool[scores.index(min(scores))], "vtc-basic")
