"""Upper bounds on the prefix hit rate of a trace, whatever the routing.

`pooled_oracle`: one LRU block cache holding the replicas' combined capacity
(`replicas * cache_blocks`), fed every request in arrival order with its blocks stored at arrival
(no prefill delay). It is what a router would get if the replicas shared one cache and never
duplicated a block; it bounds what routing can achieve with the same total capacity (up to LRU
not being the optimal eviction). `unbounded_oracle`: the same with an infinite cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from app.routing import RequestView


def pooled_oracle(
    views: Sequence[RequestView], capacity_blocks: int | None, block_size: int
) -> float:
    """Hit rate (cached prompt tokens / prompt tokens) of one shared LRU cache of that size."""
    cache: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for v in views:
        hashes = v.block_hashes(block_size)
        tokens = max(1, v.prompt_tokens)
        n = 0
        for h in hashes:
            if h not in cache:
                break
            n += 1
        hit += min(tokens, n * block_size)
        total += tokens
        for h in reversed(hashes):
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
        if capacity_blocks is not None:
            while len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return hit / total if total else 0.0


def unbounded_oracle(views: Sequence[RequestView], block_size: int) -> float:
    """Hit rate with an infinite shared cache: every block seen before is a hit."""
    return pooled_oracle(views, None, block_size)
