"""The prefix index: which replica probably holds which prompt blocks, bounded, LRU-evicted."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PrefixIndex:
    """Chained block hashes per replica, at most `max_blocks` per replica, LRU eviction.

    Size `max_blocks` to one engine's KV capacity in blocks, so the index forgets roughly what the
    engine evicts. A prompt's blocks are touched child-first, so a parent is always more recent
    than its children and is evicted after them (as vLLM frees a sequence's blocks tail-first):
    what the index keeps of a chain is a prefix. Holders of a block are a bit mask of replicas
    (no per-block containers), which keeps lookups and the garbage collector cheap.
    """

    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, int] = {}
        self._bit: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def _bit_of(self, replica_id: str) -> int:
        bit = self._bit.get(replica_id)
        if bit is None:
            free = 0
            while (1 << free) in self._names:
                free += 1
            bit = self._bit[replica_id] = 1 << free
            self._names[bit] = replica_id
            self._lru[replica_id] = OrderedDict()
        return bit

    def insert(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Record that the replica holds these blocks (a prompt's chain), most recent first."""
        bit = self._bit_of(replica_id)
        lru = self._lru[replica_id]
        holders = self._holders
        touch = lru.move_to_end
        for h in reversed(hashes[: self.max_blocks]):
            if h in lru:
                touch(h)
            else:
                lru[h] = None
                holders[h] = holders.get(h, 0) | bit
        if len(lru) > self.max_blocks:
            keep = ~bit
            pop = lru.popitem
            for _ in range(len(lru) - self.max_blocks):
                old = pop(last=False)[0]
                mask = holders[old] & keep
                if mask:
                    holders[old] = mask
                else:
                    del holders[old]

    def remove(self, replica_id: str, hashes: Iterable[int]) -> None:
        """Forget these blocks on one replica (e.g. an engine's block-removed event)."""
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        keep = ~self._bit[replica_id]
        for h in hashes:
            if h in lru:
                del lru[h]
                mask = self._holders[h] & keep
                if mask:
                    self._holders[h] = mask
                else:
                    del self._holders[h]

    def forget_replica(self, replica_id: str) -> None:
        """Drop everything recorded for a replica."""
        if replica_id not in self._bit:
            return
        self.remove(replica_id, list(self._lru[replica_id]))
        del self._lru[replica_id]
        del self._names[self._bit.pop(replica_id)]

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, how many leading blocks of the chain it holds (replicas with 0 omitted)."""
        if not hashes:
            return {}
        get = self._holders.get
        alive = get(hashes[0], 0)
        if not alive:
            return {}
        dropped: list[tuple[int, int]] = []
        n = 1
        for h in hashes[1:]:
            mask = get(h, 0) & alive
            if mask != alive:
                dropped.append((alive & ~mask, n))
                alive = mask
                if not alive:
                    break
            n += 1
        if alive:
            dropped.append((alive, n))
        names = self._names
        return {names[b]: count for bits, count in dropped for b in names if bits & b}

    def holders(self, block: int) -> list[str]:
        """Replicas recorded as holding a block."""
        mask = self._holders.get(block, 0)
        return [name for bit, name in self._names.items() if mask & bit]

    def size(self, replica_id: str | None = None) -> int:
        """Blocks recorded for one replica, or for all together."""
        if replica_id is not None:
            return len(self._lru.get(replica_id, ()))
        return sum(len(lru) for lru in self._lru.values())

    def replicas(self) -> list[str]:
        """Replicas with at least one recorded block."""
        return [r for r, lru in self._lru.items() if lru]
