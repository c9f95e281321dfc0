"""The `round_robin` policy."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from app.routing.policies.base import PolicyBase, eligible
from app.routing.types import Decision, ReplicaStats, RequestView


class RoundRobinPolicy(PolicyBase):
    """Rotate through the replicas.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
    2. Pick the next one in turn (one counter per model).
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[str, itertools.count] = {}

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        turn = next(self._turn.setdefault(request.model, itertools.count()))
        return self._decide(pool[turn % len(pool)], "round-robin", request, pool)
