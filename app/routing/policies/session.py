"""The `session` policy: consistent hashing of session keys with bounded load."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from app.routing.policies.base import PolicyBase, eligible
from app.routing.policies.power_of_two import PowerOfTwoPolicy
from app.routing.types import Decision, ReplicaStats, RequestView


def stable_hash(key: str) -> int:
    """A 64-bit hash of a string, the same in every process (blake2b)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class SessionPolicy(PolicyBase):
    """Consistent hashing of a session key with bounded load.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
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
        """The ring of these replicas: sorted points and each point's replica (cached)."""
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) > 64:
                self._rings.clear()
            points = sorted(
                (stable_hash(f"{rid}#{i}"), rid) for rid in ids for i in range(self.vnodes)
            )
            ring = self._rings[ids] = ([p for p, _ in points], [r for _, r in points])
        return ring

    def owner(self, key: str, replica_ids: Sequence[str]) -> str:
        """The replica a key maps to when no replica is loaded."""
        points, owners = self._ring(frozenset(replica_ids))
        return owners[bisect.bisect(points, stable_hash(key)) % len(points)]

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        if not request.session_key:
            d = self._fallback.choose(request, pool)
            chosen = next(c for c in pool if c.replica_id == d.replica_id)
            return self._decide(chosen, "no-session-key", request, pool)
        by_id = {c.replica_id: c for c in pool}
        points, owners = self._ring(frozenset(by_id))
        total = sum(c.in_flight for c in pool)
        bound = math.ceil(self.load_factor * (total + 1) / len(pool))
        start = bisect.bisect(points, stable_hash(request.session_key))
        first = owners[start % len(points)]
        seen: set[str] = set()
        for step in range(len(points)):
            rid = owners[(start + step) % len(points)]
            if rid in seen:
                continue
            seen.add(rid)
            if by_id[rid].in_flight < bound:
                reason = "session-affinity" if rid == first else "session-spill"
                return self._decide(by_id[rid], reason, request, pool)
        return self._decide(by_id[first], "session-affinity", request, pool)
