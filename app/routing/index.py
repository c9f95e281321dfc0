"""Prefix indexes: which replica probably holds which prompt blocks, bounded, LRU-evicted.

Both keep, per replica, at most `max_blocks` chained block hashes (size it to one engine's KV
capacity in blocks, so the index forgets roughly what the engine evicts) in least-recently-used
order. A chain's blocks are touched child-first, so a parent is always more recent than its
children and is evicted after them (as vLLM frees a sequence's blocks tail-first): what an index
keeps of a chain is a prefix of it.

- `PrefixIndex` takes any blocks (parts of chains, removals): engine KV cache events.
- `ChainIndex` takes whole chains only (each insert from the root, as `chain_hashes` returns
  it; no removal), as a router records its own decisions, and holds exactly what `PrefixIndex`
  would hold for the same inserts, faster: one radix tree shared by the replicas, whose nodes
  (runs of blocks) are matched, touched, split and evicted as units.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from heapq import heappop, heappush, heapreplace
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


class _Node:
    """Consecutive blocks of chains that every replica holding them holds together (a radix-tree
    edge), shared by the replicas."""

    __slots__ = ("blocks", "depth", "holders", "ticks")

    def __init__(self, blocks: list[int] | array, depth: int) -> None:
        self.blocks = blocks  # root side first; the deepest holder holds them all
        self.depth = depth  # the chain position of blocks[0]
        self.holders: dict[str, int] = {}  # replica -> the chain blocks it holds to here
        self.ticks: dict[str, int] = {}  # replica -> the insert that last touched the node

    def __lt__(self, other: _Node) -> bool:  # never needed: (tick, -depth) is unique per replica
        return id(self) < id(other)


class _Holdings:
    """One replica's share of the tree: its nodes in eviction order, and its block count."""

    __slots__ = ("heap", "size")

    def __init__(self) -> None:
        # One (tick, -depth, node) per node held, a min-heap in eviction order; a node touched
        # again keeps its old tick here until it comes up, and goes back in with the new one.
        self.heap: list[tuple[int, int, _Node]] = []
        self.size = 0


def _held(hashes: Sequence[int], pos: int, blocks: Sequence[int], end: int) -> int:
    """How many leading `blocks` equal `hashes[pos:]`, given that the first does and block
    `end - 1` does not (hashes are chained: equal at one position, equal before it)."""
    return 1 + bisect_left(range(1, end), True, key=lambda k: hashes[pos + k] != blocks[k])


class ChainIndex:
    """Whole chains per replica, at most `max_blocks` blocks per replica, LRU eviction.

    Holds exactly what `PrefixIndex` holds after the same inserts (the same blocks, evicted in
    the same order), in one radix tree shared by the replicas: each node (a run of blocks,
    found by its first block) records how far into it each replica holds. A replica that holds
    part of a node holds all of its ancestors (eviction takes the deepest blocks first).

    1. `match` walks the chain node by node from the root: a node is held as far as its last
       block equal to the chain's block at the same position (binary search inside the node
       where the chain diverges); the answer is each replica's reach on the deepest node it
       holds, a dict update per node, not a walk per replica.
    2. `insert` walks the same way, splits the node where the chain ends or leaves it, adds
       the chain's new blocks as one node, and marks the nodes on the path as the replica's,
       touched by this insert (deeper nodes evicted first among those of one insert).
    3. Eviction takes the replica's least recently touched node and drops the replica's part
       of it whole, or its deepest blocks when fewer must go; a node nobody holds is removed.
    """

    def __init__(self, max_blocks: int = 100_000) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self._heads: dict[int, _Node] = {}  # each node's first block -> the node
        self._holdings: dict[str, _Holdings] = {}
        self._tick = 0

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per replica, how many leading blocks of the chain it holds (replicas with 0 omitted)."""
        out: dict[str, int] = {}
        heads, pos, n = self._heads, 0, len(hashes)
        while pos < n:
            node = heads.get(hashes[pos])
            if node is None or node.depth != pos:
                break
            blocks = node.blocks
            size = len(blocks)
            end = size if size <= n - pos else n - pos
            if hashes[pos + end - 1] != blocks[end - 1]:
                end = _held(hashes, pos, blocks, end)
            if end == size:
                out.update(node.holders)
                pos += size
                continue
            reach = pos + end
            for replica_id, held in node.holders.items():
                out[replica_id] = held if held < reach else reach
            break
        return out

    def insert(self, replica_id: str, hashes: Sequence[int]) -> None:
        """Record that the replica holds this whole chain (root first)."""
        mine = self._holdings.get(replica_id)
        if mine is None:
            mine = self._holdings[replica_id] = _Holdings()
        if len(hashes) > self.max_blocks:
            hashes = hashes[: self.max_blocks]
        self._tick += 1
        tick, heap, heads = self._tick, mine.heap, self._heads
        pos, n = 0, len(hashes)
        # The held path (each node becomes the replica's, whole, as of now); the walk step is
        # `match`'s, inline on purpose: a helper call per node costs ~1 us a decision here.
        while pos < n:
            node = heads.get(hashes[pos])
            if node is None or node.depth != pos:
                break
            size = len(node.blocks)
            end = size if size <= n - pos else n - pos
            if hashes[pos + end - 1] != node.blocks[end - 1]:
                end = _held(hashes, pos, node.blocks, end)
            if end < size:
                self._split(node, end)
            pos += end
            held = node.holders.get(replica_id)
            if held is None:
                heappush(heap, (tick, -node.depth, node))
                held = node.depth
            mine.size += pos - held
            node.holders[replica_id] = pos
            node.ticks[replica_id] = tick
        if pos < n:  # the rest of the chain: a new node
            new = hashes[pos:]
            node = _Node(new if isinstance(new, (list, array)) else list(new), pos)
            heads[node.blocks[0]] = node
            node.holders[replica_id] = n
            node.ticks[replica_id] = tick
            heappush(heap, (tick, -pos, node))
            mine.size += n - pos
        if mine.size > self.max_blocks:
            self._evict(replica_id, mine, mine.size - self.max_blocks)

    def _split(self, node: _Node, cut: int) -> None:
        """Keep the first `cut` blocks in `node`; a new node below it takes the rest, held by
        the holders that reach past the cut, as recently as they touched `node`."""
        deep = _Node(node.blocks[cut:], node.depth + cut)
        del node.blocks[cut:]
        self._heads[deep.blocks[0]] = deep
        end, holders, ticks = deep.depth, node.holders, node.ticks
        for replica_id, held in holders.items():
            if held > end:
                holders[replica_id] = end
                tick = deep.ticks[replica_id] = ticks[replica_id]
                deep.holders[replica_id] = held
                heappush(self._holdings[replica_id].heap, (tick, -deep.depth, deep))

    def _evict(self, replica_id: str, mine: _Holdings, excess: int) -> None:
        heap = mine.heap
        while excess > 0:
            tick, _, node = heap[0]
            touched = node.ticks[replica_id]
            if touched != tick:  # touched since: back in at its place now
                heapreplace(heap, (touched, -node.depth, node))
                continue
            held = node.holders[replica_id] - node.depth
            if held > excess:  # only its deepest blocks go
                node.holders[replica_id] -= excess
                mine.size -= excess
                self._trim(node)
                return
            heappop(heap)
            self._drop(node, replica_id)
            mine.size -= held
            excess -= held

    def _drop(self, node: _Node, replica_id: str) -> None:
        """The replica no longer holds any of the node (its heap entry is gone already)."""
        del node.holders[replica_id], node.ticks[replica_id]
        if node.holders:
            self._trim(node)
        elif self._heads.get(node.blocks[0]) is node:
            del self._heads[node.blocks[0]]

    @staticmethod
    def _trim(node: _Node) -> None:
        """Cut the blocks that no holder reaches any more."""
        keep = max(node.holders.values()) - node.depth
        if keep < len(node.blocks):
            del node.blocks[keep:]

    def _nodes(self, replica_id: str) -> list[_Node]:
        """The replica's nodes, least recently used first (deepest first within one insert)."""
        mine = self._holdings.get(replica_id)
        nodes = [node for *_, node in mine.heap] if mine else []
        return sorted(nodes, key=lambda node: (node.ticks[replica_id], -node.depth))

    def forget_replica(self, replica_id: str) -> None:
        """Drop everything recorded for a replica."""
        for node in self._nodes(replica_id):
            self._drop(node, replica_id)
        self._holdings.pop(replica_id, None)

    def holders(self, block: int) -> list[str]:
        """Replicas recorded as holding a block (a scan: for checks, not for routing)."""
        return [name for name in self._holdings if block in self.blocks(name)]

    def blocks(self, replica_id: str) -> list[int]:
        """A replica's recorded blocks, least recently used first (deepest first within a node)."""
        return [
            h
            for node in self._nodes(replica_id)
            for h in reversed(node.blocks[: node.holders[replica_id] - node.depth])
        ]

    def size(self, replica_id: str | None = None) -> int:
        """Blocks recorded for one replica, or for all together."""
        if replica_id is not None:
            mine = self._holdings.get(replica_id)
            return mine.size if mine else 0
        return sum(mine.size for mine in self._holdings.values())

    def replicas(self) -> list[str]:
        """Replicas with at least one recorded block."""
        return [r for r, mine in self._holdings.items() if mine.size]
