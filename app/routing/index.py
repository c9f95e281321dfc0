"""Prefix indexes: which replica probably holds which prompt blocks, bounded, LRU-evicted.

Both keep, per replica, at most `max_blocks` chained block hashes (size it to one engine's KV
capacity in blocks, so the index forgets roughly what the engine evicts) in least-recently-used
order. A chain's blocks are touched child-first, so a parent is always more recent than its
children and is evicted after them (as vLLM frees a sequence's blocks tail-first): what an index
keeps of a chain is a prefix of it.

- `PrefixIndex` takes any blocks (parts of chains, removals): engine KV cache events.
- `ChainIndex` takes whole chains only (each insert from the root, as `chain_hashes` returns
  it; no removal), as a router records its own decisions, and holds exactly what `PrefixIndex`
  would hold for the same inserts, faster: blocks are grouped into runs (a radix tree's edges)
  that are touched, split and evicted as units.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from itertools import repeat, takewhile


class PrefixIndex:
    """Block hashes per replica, at most `max_blocks` per replica, LRU eviction, block by block.

    Each replica's blocks are one `OrderedDict` in LRU order.
    """

    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def insert(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Record that the replica holds these blocks (root first), touching them child-first."""
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = OrderedDict()
        touch = lru.move_to_end
        for h in reversed(hashes[: self.max_blocks]):
            if h in lru:
                touch(h)
            else:
                lru[h] = None
        excess = len(lru) - self.max_blocks
        if excess > 0:
            deque(map(lru.popitem, repeat(False, excess)), 0)

    def remove(self, replica_id: str, hashes: Iterable[int]) -> None:
        """Forget these blocks on one replica (e.g. an engine's block-removed event)."""
        lru = self._lru.get(replica_id)
        if lru is not None:
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
        return {
            name: len(list(takewhile(lru.__contains__, hashes)))
            for name, lru in self._lru.items()
            if first in lru
        }

    def holders(self, block: int) -> list[str]:
        """Replicas recorded as holding a block."""
        return [name for name, lru in self._lru.items() if block in lru]

    def blocks(self, replica_id: str) -> list[int]:
        """A replica's recorded blocks, least recently used first."""
        return list(self._lru.get(replica_id, ()))

    def size(self, replica_id: str | None = None) -> int:
        """Blocks recorded for one replica, or for all together."""
        if replica_id is not None:
            return len(self._lru.get(replica_id, ()))
        return sum(len(lru) for lru in self._lru.values())

    def replicas(self) -> list[str]:
        """Replicas with at least one recorded block."""
        return [r for r, lru in self._lru.items() if lru]


class _Run:
    """Consecutive blocks of chains that are always touched together (a radix-tree edge)."""

    __slots__ = ("blocks", "depth")

    def __init__(self, blocks: list[int], depth: int) -> None:
        self.blocks = blocks  # root side first
        self.depth = depth  # the chain position of blocks[0]


class _Replica:
    __slots__ = ("heads", "lru", "size")

    def __init__(self) -> None:
        self.heads: dict[int, _Run] = {}  # each run's first block -> the run
        self.lru: OrderedDict[_Run, None] = OrderedDict()  # least recently used first
        self.size = 0

    def walk(self, hashes: Sequence[int], path: list[_Run] | None = None) -> int:
        """How many leading blocks of the chain are held; the runs holding them are appended
        to `path` (root first; the last one may hold them only in part)."""
        heads, pos, n = self.heads, 0, len(hashes)
        while pos < n:
            run = heads.get(hashes[pos])
            if run is None or run.depth != pos:
                break
            if path is not None:
                path.append(run)
            blocks = run.blocks
            end = min(len(blocks), n - pos)
            if hashes[pos + end - 1] == blocks[end - 1]:  # chained: equal here, equal before
                pos += end
                if end < len(blocks):
                    break
                continue
            return (
                pos
                + 1
                + bisect_left(range(1, end), True, key=lambda k: hashes[pos + k] != blocks[k])
            )
        return pos


class ChainIndex:
    """Whole chains per replica, at most `max_blocks` blocks per replica, LRU eviction.

    Holds exactly what `PrefixIndex` holds after the same inserts (the same blocks, evicted in
    the same order), with runs of blocks (radix-tree edges) as units, looked up by their first
    block only:

    1. `match` walks the chain run by run from the root: a run is held as far as its last
       block equal to the chain's block at the same position (hashes are chained, so equal
       there means equal before; binary search inside the run where the chain diverges).
    2. `insert` walks the same way, splits the run where the held prefix ends inside one,
       appends the new blocks as one run, then touches the held runs from the deepest to the
       root.
    3. Eviction takes the least recently used run (a leaf: a parent is touched after its
       children) and drops it whole, or its deepest blocks when fewer must go.
    Per insert or match that is a few operations per run on the chain's path, not per block.
    """

    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._replicas: dict[str, _Replica] = {}

    def insert(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Record that the replica holds this whole chain (root first)."""
        rep = self._replicas.get(replica_id)
        if rep is None:
            rep = self._replicas[replica_id] = _Replica()
        if len(hashes) > self.max_blocks:
            hashes = hashes[: self.max_blocks]
        heads, lru = rep.heads, rep.lru
        path: list[_Run] = []
        held = rep.walk(hashes, path)
        if path and held < path[-1].depth + len(path[-1].blocks):  # split the last run
            tail = path[-1]
            cut = held - tail.depth
            head = path[-1] = _Run(tail.blocks[:cut], tail.depth)
            del tail.blocks[:cut]
            tail.depth = held
            heads[head.blocks[0]] = head
            heads[tail.blocks[0]] = tail
            lru[head] = None
        if held < len(hashes):
            new = hashes[held:]
            run = _Run(new if isinstance(new, list) else list(new), held)
            heads[run.blocks[0]] = run
            lru[run] = None
            rep.size += len(run.blocks)
        touch = lru.move_to_end
        for run in reversed(path):
            touch(run)
        excess = rep.size - self.max_blocks
        while excess > 0:
            run = next(iter(lru))
            blocks = run.blocks
            if len(blocks) <= excess:
                del lru[run]
                if heads.get(blocks[0]) is run:
                    del heads[blocks[0]]
                gone = len(blocks)
            else:
                gone = excess
                del blocks[-excess:]
            rep.size -= gone
            excess -= gone

    def forget_replica(self, replica_id: str) -> None:
        """Drop everything recorded for a replica."""
        self._replicas.pop(replica_id, None)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, how many leading blocks of the chain it holds (replicas with 0 omitted)."""
        if not hashes:
            return {}
        first, n = hashes[0], len(hashes)
        out: dict[str, int] = {}
        for name, rep in self._replicas.items():
            run = rep.heads.get(first)
            if run is None or run.depth:
                continue
            end = len(run.blocks)  # the common case, inlined: the first run is held whole
            if end < n and hashes[end - 1] == run.blocks[-1] and hashes[end] not in rep.heads:
                out[name] = end
            else:
                out[name] = rep.walk(hashes)
        return out

    def holders(self, block: int) -> list[str]:
        """Replicas recorded as holding a block (a scan: for checks, not for routing)."""
        return [name for name in self._replicas if block in self.blocks(name)]

    def blocks(self, replica_id: str) -> list[int]:
        """A replica's recorded blocks, least recently used first (deepest first within a run)."""
        rep = self._replicas.get(replica_id)
        return [h for run in rep.lru for h in reversed(run.blocks)] if rep else []

    def size(self, replica_id: str | None = None) -> int:
        """Blocks recorded for one replica, or for all together."""
        if replica_id is not None:
            rep = self._replicas.get(replica_id)
            return rep.size if rep else 0
        return sum(rep.size for rep in self._replicas.values())

    def replicas(self) -> list[str]:
        """Replicas with at least one recorded block."""
        return [r for r, rep in self._replicas.items() if rep.size]
