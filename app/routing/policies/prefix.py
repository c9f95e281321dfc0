"""The `prefix` policy: the longest cached prefix, as predicted from the policy's own decisions."""

from __future__ import annotations

from collections.abc import Sequence

from app.routing.policies.base import IndexedPolicy, eligible, pending
from app.routing.prefix_match import MATCH_REASONS, match_ratios, match_reason
from app.routing.receipts import build_receipt
from app.routing.tokens import DEFAULT_BLOCK_SIZE
from app.routing.types import Decision, ReplicaStats, RequestView


def best_match(
    pool: Sequence[ReplicaStats],
    ratios: Sequence[float],
    min_match: float,
    reasons: Sequence[str] = MATCH_REASONS,
) -> tuple[ReplicaStats, str]:
    """The best-matching replica with the fewest in-flight plus queued requests, and its match
    reason, if the best match covers at least `min_match`; else the least loaded, `least-load`."""
    best = max(ratios)
    if best > 0 and best >= min_match:
        top = [c for c, r in zip(pool, ratios, strict=True) if r == best]
        return min(top, key=pending), match_reason(best, reasons)
    return min(pool, key=pending), "least-load"


class PrefixPolicy(IndexedPolicy):
    """Longest cached prefix, from an index of this policy's own past decisions.

    1. Keep the eligible replicas (healthy; for a LoRA request, its adapter's holders with
       room, when any).
    2. Hash the prompt's full blocks, chained like vLLM (`block_size` tokens a block).
    3. Look the chain up in the model's index (LRU, `max_blocks` per replica).
    4. If the best match covers at least `min_match` of the prompt, pick the best-matching
       replica with the fewest in-flight plus queued requests (`prefix-match=<ratio>`);
       otherwise the least loaded replica (`least-load`).
    5. Record the prompt's blocks under the chosen replica.
    """

    name = "prefix"

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 100_000,
        min_match: float = 0.1,
    ) -> None:
        super().__init__(block_size, max_blocks)
        self.min_match = min_match

    def choose(self, request: RequestView, candidates: Sequence[ReplicaStats]) -> Decision:
        pool = eligible(request, candidates)
        index = self.index(request.model)
        ratios = match_ratios(index, request, pool, self.block_size)
        chosen, reason = best_match(pool, ratios, self.min_match)
        index.insert(chosen.replica_id, request.block_hashes(self.block_size))
        ratio = ratios[pool.index(chosen)]
        receipt = None
        if request.receipt:
            receipt = build_receipt(self.name, chosen.replica_id, reason, request, pool, ratios,
                                    block_size=self.block_size)  # fmt: skip
        return Decision(chosen.replica_id, self.name, reason, ratio, receipt)
