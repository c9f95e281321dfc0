"""The `power_of_two` policy."""

from __future__ import annotations

import random
from collections.abc import Sequence

from app.routing.policies.base import PolicyBase, eligible, pending
from app.routing.types import Decision, ReplicaStats, RequestView


class PowerOfTwoPolicy(PolicyBase):
    """Least in-flight of two random replicas.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
    2. Sample two at random (seeded); pick the one with fewer in-flight plus queued requests.
    """

    name = "power_of_two"

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        pair = self._rng.sample(pool, 2) if len(pool) > 1 else pool
        return self._decide(min(pair, key=pending), "least-load", request, pool)
