"""What the policies share: the eligible replicas, the no-op hooks, a prefix index per model."""

from __future__ import annotations

from collections.abc import Sequence

from app.routing.index import ChainIndex
from app.routing.prefix_match import BlockIndex
from app.routing.receipts import build_receipt
from app.routing.tokens import DEFAULT_BLOCK_SIZE
from app.routing.types import Decision, NoReplicaError, ReplicaStats, RequestView


def eligible(request: RequestView, candidates: Sequence[ReplicaStats]) -> list[ReplicaStats]:
    """Healthy candidates; for a LoRA request, those holding its adapter with room for it
    (`has_room`) when any do, else every healthy one (the chosen one loads the adapter)."""
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        raise NoReplicaError(f"no healthy replica for model {request.model!r}")
    if request.lora_adapter:
        holding = [c for c in healthy if request.lora_adapter in c.lora_adapters and has_room(c)]
        if holding:
            return holding
    return healthy


def has_room(replica: ReplicaStats) -> bool:
    """Whether a replica takes another request now: its engine queues none and it is under
    its concurrency limit."""
    return replica.queued == 0 and replica.in_flight < replica.max_concurrency


def pending(replica: ReplicaStats) -> int:
    """The replica's in-flight plus queued requests."""
    return replica.in_flight + replica.queued


class PolicyBase:
    """The `Policy` protocol's hooks, doing nothing; policies override what they use."""

    name = "base"

    @property
    def kv_events(self) -> bool:
        """Whether the policy routes from the engines' KV cache events (`on_kv_event`): its
        engines then publish them, and its router feeds them in."""
        return callable(getattr(self, "on_kv_event", None))

    def on_first_token(self, request: RequestView, replica_id: str) -> None:
        """Nothing to do by default."""

    def on_complete(self, request: RequestView, replica_id: str) -> None:
        """Nothing to do by default."""

    def forget_replica(self, replica_id: str) -> None:
        """Nothing to do by default."""

    def _decide(
        self,
        replica: ReplicaStats,
        reason: str,
        request: RequestView | None = None,
        pool: Sequence[ReplicaStats] = (),
    ) -> Decision:
        """The decision for `replica`; with its receipt (candidates and loads, no prefix
        signal) when `request` asks for one."""
        if request is None or not request.receipt:
            return Decision(replica.replica_id, self.name, reason)
        receipt = build_receipt(self.name, replica.replica_id, reason, request, pool,
                                block_size=DEFAULT_BLOCK_SIZE)  # fmt: skip
        return Decision(replica.replica_id, self.name, reason, receipt=receipt)


class IndexedPolicy(PolicyBase):
    """A policy with one prefix index per model (`index_kind`, `max_blocks` per replica)."""

    index_kind: type[BlockIndex] = ChainIndex

    def __init__(self, block_size: int, max_blocks: int) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._indexes: dict[str, BlockIndex] = {}

    def index(self, model: str) -> BlockIndex:
        """The model's prefix index (made on first use)."""
        index = self._indexes.get(model)
        if index is None:
            index = self._indexes[model] = self.index_kind(self.max_blocks)
        return index

    def forget_replica(self, replica_id: str) -> None:
        for index in self._indexes.values():
            index.forget_replica(replica_id)
