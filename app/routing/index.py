"""The prefix index: which replica probably holds which prompt blocks, bounded, LRU-evicted."""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import repeat, takewhile


class PrefixIndex:
    """Chained block hashes per replica, at most `max_blocks` per replica, LRU eviction.

    Size `max_blocks` to one engine's KV capacity in blocks, so the index forgets roughly what the
    engine evicts. A prompt's blocks are touched child-first, so a parent is always more recent
    than its children and is evicted after them (as vLLM frees a sequence's blocks tail-first):
    what the index keeps of a chain is a prefix.

    `whole_chains` (the default) promises that every `insert` is a whole chain from its root
    (as `chain_hashes` returns it) and nothing is `remove`d: then what a replica holds of any
    chain is a prefix of it, and `match` finds its end by binary search and `insert` moves the
    held prefix and appends the rest in bulk. Indexes fed partial chains (engine KV events) pass
    `whole_chains=False`; `remove` switches to that mode too; the results are the same, found
    block by block. Each replica's blocks are one `OrderedDict` in LRU order, with no shared
    per-block table, so an update is a few C-level dict operations per block.
    """

    def __init__(self, max_blocks: int = 100_000, whole_chains: bool = True) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self.whole_chains = whole_chains
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def insert(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Record that the replica holds these blocks (a prompt's chain), most recent first."""
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
        if len(hashes) > self.max_blocks:
            hashes = hashes[: self.max_blocks]
        if not self.whole_chains or not self._insert_chain(lru, hashes):
            touch = lru.move_to_end
            for h in reversed(hashes):
                if h in lru:
                    touch(h)
                else:
                    lru[h] = None
        excess = len(lru) - self.max_blocks
        if excess > 0:
            deque(map(lru.popitem, repeat(False, excess)), 0)

    def _insert_chain(self, lru: OrderedDict[int, None], hashes: Sequence[int]) -> bool:
        """Bulk insert when the held blocks are a prefix of `hashes`; False (and the index
        switched to block-by-block mode) when they turn out not to be."""
        rev = hashes[::-1]
        new = bisect_left(rev, True, key=lru.__contains__)  # rev[:new] not held, the rest held
        before = len(lru)
        lru.update(zip(rev[:new], repeat(None)))
        if len(lru) == before + new:
            try:
                deque(map(lru.move_to_end, rev[new:]), 0)
                return True
            except KeyError:
                pass
        self.whole_chains = False  # not whole chains after all: the caller redoes it in order
        return False

    def remove(self, replica_id: str, hashes: Iterable[int]) -> None:
        """Forget these blocks on one replica (e.g. an engine's block-removed event)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        self.whole_chains = False
        for h in hashes:
            lru.pop(h, None)

    def forget_replica(self, replica_id: str) -> None:
        """Drop everything recorded for a replica."""
        self._lru.pop(replica_id, None)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, how many leading blocks of the chain it holds (replicas with 0 omitted)."""
        if not hashes:
            return {}
        first = hashes[0]
        out: dict[str, int] = {}
        if self.whole_chains:
            rev = None
            n = len(hashes)
            last = 0  # replicas often hold the same prefix: try the previous answer first
            for name, lru in self._lru.items():
                if first in lru:
                    if last and hashes[last - 1] in lru and (last == n or hashes[last] not in lru):
                        out[name] = last
                        continue
                    if rev is None:
                        rev = hashes[::-1]
                    out[name] = last = n - bisect_left(rev, True, key=lru.__contains__)
        else:
            for name, lru in self._lru.items():
                if first in lru:
                    out[name] = len(list(takewhile(lru.__contains__, hashes)))
        return out

    def holders(self, block: int) -> list[str]:
        """Replicas recorded as holding a block."""
        return [name for name, lru in self._lru.items() if block in lru]

    @property
    def _holders(self) -> dict[int, list[str]]:
        """Every recorded block and its holders (computed; for checks, not for routing)."""
        out: dict[int, list[str]] = {}
        for name, lru in self._lru.items():
            for h in lru:
                out.setdefault(h, []).append(name)
        return out

    def size(self, replica_id: str | None = None) -> int:
        """Blocks recorded for one replica, or for all together."""
        if replica_id is not None:
            return len(self._lru.get(replica_id, ()))
        return sum(len(lru) for lru in self._lru.values())

    def replicas(self) -> list[str]:
        """Replicas with at least one recorded block."""
        return [r for r, lru in self._lru.items() if lru]
