"""The match-ratio rule: how much of a prompt each replica holds in its cached prefix.

Shared by the `prefix`, `kv` and `scored` policies: a replica's ratio is its leading blocks of
the prompt's chain in the index times `block_size`, over the prompt's tokens (0 to 1). Reasons
name the ratio with two decimals (`prefix-match=0.83`).
"""

from __future__ import annotations

from collections.abc import Sequence

from app.routing.index import ChainIndex, PrefixIndex
from app.routing.types import ReplicaStats, RequestView

BlockIndex = ChainIndex | PrefixIndex


def match_reasons(kind: str) -> list[str]:
    """`<kind>=<ratio>` for the ratios 0.00 to 1.00, indexed by `round(ratio * 100)` (two
    decimals, ties to even): a lookup, as formatting costs ~1 us on the routing hot path."""
    return [f"{kind}={i / 100:.2f}" for i in range(101)]


MATCH_REASONS = match_reasons("prefix-match")
KV_MATCH_REASONS = match_reasons("kv-match")


def match_reason(ratio: float, reasons: Sequence[str] = MATCH_REASONS) -> str:
    """The reason naming a match ratio (0 to 1), e.g. `prefix-match=0.83`."""
    return reasons[round(ratio * 100)]


def match_ratios(
    index: BlockIndex, request: RequestView, pool: Sequence[ReplicaStats], block_size: int
) -> list[float]:
    """Each replica's share of the prompt in its cached prefix (0 to 1), in `pool` order."""
    hashes = request.block_hashes(block_size)
    found = index.match(hashes) if hashes else None
    if not found:
        return [0.0] * len(pool)
    share = block_size / max(request.prompt_tokens, 1)  # of the prompt, one block
    ratios = [found.get(c.replica_id, 0) * share for c in pool]
    if len(hashes) * share > 1.0:  # rounding could lift a ratio over 1 (none can be more)
        ratios = [min(1.0, r) for r in ratios]
    return ratios
