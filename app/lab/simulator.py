"""A simulator of vLLM replicas (not a real engine) and the replay loop in simulated time.

Model of one simulated replica:
- a block-level prefix cache of `cache_blocks` blocks with LRU eviction; a prompt's full blocks
  are inserted when its prefill ends, child-first (so parents outlive children, as in vLLM);
  generated tokens are not cached;
- at most `max_concurrency` admitted requests; more wait in an admission queue (FIFO);
- one prefill at a time (FIFO): `prefill_overhead + prefill_cost * uncached prompt tokens`, where
  the cached tokens are the prompt's leading blocks found in the cache when its prefill starts;
- decode runs beside other requests: `decode_cost * output tokens` after the prefill ends (the
  answer's tokens when the trace has them, else `max_tokens`).
TTFT is arrival to end of prefill. No real time passes: events are ordered on a heap.

With a KV event feed (`replay(..., feed=...)`, `app.lab.kv_feed`), each replica publishes what
its cache did at the end of every prefill as one batch of vLLM-shaped events, as a vLLM engine
publishes one batch per step: `BlockStored` for the blocks that entered the cache (in the
router's hash space: `token_ids` None) and `BlockRemoved` for those evicted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.lab.trace import TraceRequest
from app.routing import DEFAULT_BLOCK_SIZE, Decision, Policy, ReplicaStats, RequestView
from app.routing.kv_events import BlockRemoved, BlockStored, KvEvent


@dataclass(frozen=True, slots=True)
class SimSettings:
    """The simulated replicas' shape and costs (seconds)."""

    cache_blocks: int = 2048
    block_size: int = DEFAULT_BLOCK_SIZE
    max_concurrency: int = 32
    prefill_cost: float = 0.0002
    prefill_overhead: float = 0.005
    decode_cost: float = 0.01


@dataclass(slots=True)
class _Job:
    index: int
    arrival: float
    view: RequestView
    hashes: list[int]
    prompt_tokens: int
    max_tokens: int
    replica: int = -1  # -1: never dispatched (refused or dropped by an admission rule)
    cached_tokens: int = 0
    ttft: float = 0.0
    finish: float = 0.0


class BlockCache(OrderedDict[int, None]):
    """Block hashes with LRU eviction at `capacity` blocks: the engines' prefix-cache model."""

    def __init__(self, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        self.capacity = capacity
        self.block_size = block_size  # tokens a block, for the events

    def prefix(self, hashes: Sequence[int]) -> int:
        """Leading blocks of a chain that are in the cache."""
        n = 0
        for h in hashes:
            if h not in self:
                break
            n += 1
        return n

    def store(self, hashes: Sequence[int]) -> list[KvEvent]:
        """Insert (or refresh) a chain's blocks, then evict the least recently used; what
        changed, as vLLM's KV events in the router's hash space, in vLLM's order (a block is
        evicted when its space is taken for a new one, and stored once filled): a
        `BlockRemoved` of the evicted blocks, then a `BlockStored` for each run of consecutive
        new blocks (in chain order, with its parent block)."""
        chain = hashes[: self.capacity]
        new = [i for i, h in enumerate(chain) if h not in self]
        for h in reversed(chain):
            if h in self:
                self.move_to_end(h)
            else:
                self[h] = None
        excess = len(self) - self.capacity
        evicted = [self.popitem(last=False)[0] for _ in range(excess)]
        events: list[KvEvent] = [BlockRemoved(evicted)] if evicted else []
        start = 0
        for k in range(1, len(new) + 1):
            if k == len(new) or new[k] != new[k - 1] + 1:  # the end of a run of new blocks
                first, last = new[start], new[k - 1]
                parent = chain[first - 1] if first else None
                events.append(
                    BlockStored(list(chain[first : last + 1]), parent, None, self.block_size)
                )
                start = k
        return events


class SimulatedReplica:
    """One simulated vLLM replica: LRU prefix cache in blocks, concurrency limit, FIFO prefill."""

    def __init__(self, replica_id: str, settings: SimSettings) -> None:
        self.replica_id = replica_id
        self.s = settings
        self.cache = BlockCache(settings.cache_blocks, settings.block_size)
        self.running: list[_Job] = []
        self.waiting: deque[_Job] = deque()
        self.prefill_queue: deque[_Job] = deque()
        self.prefilling: _Job | None = None
        self.healthy = True
        self._load_area = 0.0
        self._last_t = 0.0
        self._held_blocks = 0
        self.outbox: list[list[KvEvent]] = []  # event batches not yet published
        self.publish_events = False

    # --- observable state
    @property
    def in_flight(self) -> int:
        return len(self.running)

    def stats(self) -> ReplicaStats:
        return ReplicaStats(
            self.replica_id,
            healthy=self.healthy,
            in_flight=len(self.running),
            queued=len(self.waiting),
            kv_usage=min(1.0, self._held_blocks / self.s.cache_blocks),
            max_concurrency=self.s.max_concurrency,
        )

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """Leading blocks of a chain that are in the cache."""
        return self.cache.prefix(hashes)

    def _account(self, now: float) -> None:
        self._load_area += (len(self.running) + len(self.waiting)) * (now - self._last_t)
        self._last_t = now

    # --- events; each returns (time, kind, job) events to schedule
    def submit(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        self._account(now)
        if len(self.running) < self.s.max_concurrency:
            return self._admit(job, now)
        self.waiting.append(job)
        return []

    def _admit(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        self.running.append(job)
        self._held_blocks += len(job.hashes)
        self.prefill_queue.append(job)
        return self._next_prefill(now) if self.prefilling is None else []

    def _next_prefill(self, now: float) -> list[tuple[float, str, _Job]]:
        if not self.prefill_queue:
            self.prefilling = None
            return []
        job = self.prefill_queue.popleft()
        self.prefilling = job
        cached = self.cached_prefix(job.hashes)
        job.cached_tokens = min(job.prompt_tokens, cached * self.s.block_size)
        uncached = job.prompt_tokens - job.cached_tokens
        return [(now + self.s.prefill_overhead + self.s.prefill_cost * uncached, "prefilled", job)]

    def prefilled(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        job.ttft = now - job.arrival
        events = self.cache.store(job.hashes)
        if self.publish_events and events:
            self.outbox.append(events)
        done = (now + self.s.decode_cost * job.max_tokens, "finished", job)
        return [done, *self._next_prefill(now)]

    def finished(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        self._account(now)
        job.finish = now
        self.running.remove(job)
        self._held_blocks -= len(job.hashes)
        if self.waiting:
            return self._admit(self.waiting.popleft(), now)
        return []

    def mean_load(self, end: float) -> float:
        """Time-averaged in-flight plus waiting requests up to `end`."""
        self._account(end)
        return self._load_area / end if end > 0 else 0.0


ReplicaSimulator = SimulatedReplica


class Admission(Protocol):
    """An admission rule in front of the simulated replicas (e.g. a tenant-fair queue).

    `arrive` takes or refuses a request (False: refused, never dispatched); `next` names a
    waiting request to dispatch now, given the free slots (replicas x `max_concurrency` less
    their in-flight and queued requests), or None; `complete` hears of each dispatched
    request's end. A `gated` rule dispatches into free slots only, and its router is offered
    only the replicas with one; an ungated rule's router sees every replica.
    """

    gated: bool

    def arrive(self, index: int, request: TraceRequest, now: float) -> bool: ...

    def next(self, now: float, free_slots: int) -> int | None: ...

    def complete(self, index: int, request: TraceRequest, now: float) -> None: ...


class EventFeed(Protocol):
    """Carries the replicas' KV event batches to the router (`app.lab.kv_feed`): `publish`
    takes a replica's batch when its cache changed and `receive` one delivery when it is due;
    each answers the deliveries to schedule, as (simulated time, delivery)."""

    def publish(
        self, replica_id: str, events: list[KvEvent], now: float
    ) -> list[tuple[float, Any]]: ...

    def receive(self, delivery: Any, now: float) -> list[tuple[float, Any]]: ...


Observer = Callable[[Sequence[SimulatedReplica]], None]


@dataclass(slots=True)
class ReplayResult:
    """What one replay produced: per-request outcomes and per-replica loads."""

    jobs: list[_Job]
    mean_loads: list[float]
    makespan: float
    decisions: list[Decision] = field(default_factory=list)


def replay(
    requests: Sequence[TraceRequest],
    policy: Policy,
    replicas: int,
    settings: SimSettings | None = None,
    views: Sequence[RequestView] | None = None,
    admission: Admission | None = None,
    feed: EventFeed | None = None,
    observe: Observer | None = None,
) -> ReplayResult:
    """Route every request of the trace with `policy` onto simulated replicas, in simulated time.

    Policies hear of first tokens (`on_first_token`, at the end of the prefill) and of
    completions (`on_complete`), as a streaming router would. With `admission`, arrivals go to
    it and are dispatched when it names them (after each arrival and each completion). With
    `feed`, the replicas publish their caches' KV events to it at the end of each prefill, and
    it delivers them when it says. `observe` sees the replicas just before each decision.
    """
    s = settings or SimSettings()
    sims = [SimulatedReplica(f"replica-{i}", s) for i in range(replicas)]
    for sim in sims:
        sim.publish_events = feed is not None
    index_of = {sim.replica_id: i for i, sim in enumerate(sims)}
    views = views if views is not None else [r.view() for r in requests]
    jobs = [
        _Job(i, r.t, v, v.block_hashes(s.block_size), max(1, v.prompt_tokens), r.decode_tokens)
        for i, (r, v) in enumerate(zip(requests, views, strict=True))
    ]
    seq = itertools.count()
    heap: list[tuple[float, int, str, Any]] = [(j.arrival, next(seq), "arrive", j) for j in jobs]
    heapq.heapify(heap)
    decisions: list[Decision] = []
    end = 0.0

    def dispatch(job: _Job, now: float, pool: list[SimulatedReplica]) -> list:
        if observe is not None:
            observe(sims)
        decision = policy.choose(job.view, [sim.stats() for sim in pool])
        decisions.append(decision)
        job.replica = index_of[decision.replica_id]
        return sims[job.replica].submit(job, now)

    def admit(now: float) -> list[tuple[float, str, _Job]]:
        """Dispatch what `admission` names (a gated rule's only to replicas with a free slot)."""
        assert admission is not None
        out: list[tuple[float, str, _Job]] = []
        while True:
            free = [sim for sim in sims if len(sim.running) + len(sim.waiting) < s.max_concurrency]
            slots = sum(s.max_concurrency - len(sim.running) - len(sim.waiting) for sim in free)
            index = admission.next(now, slots)
            if index is None:
                return out
            out += dispatch(jobs[index], now, free if admission.gated and free else sims)

    def step(kind: str, job: _Job, now: float) -> list[tuple[float, str, Any]]:
        """One request's event: its arrival, the end of its prefill, or its completion."""
        if kind == "arrive":
            if admission is None:
                return dispatch(job, now, sims)
            return admit(now) if admission.arrive(job.index, requests[job.index], now) else []
        sim = sims[job.replica]
        if kind == "prefilled":
            new: list[tuple[float, str, Any]] = list(sim.prefilled(job, now))
            policy.on_first_token(job.view, sim.replica_id)
            if feed is not None:
                for batch in sim.outbox:
                    new += [(t, "kv", d) for t, d in feed.publish(sim.replica_id, batch, now)]
                sim.outbox.clear()
            return new
        new = list(sim.finished(job, now))
        policy.on_complete(job.view, sim.replica_id)
        if admission is not None:
            admission.complete(job.index, requests[job.index], now)
            new += admit(now)
        return new

    while heap:
        now, _, kind, item = heapq.heappop(heap)
        if kind == "kv":  # a delivery to the router: not part of the requests' makespan
            assert feed is not None
            new = [(t, "kv", d) for t, d in feed.receive(item, now)]
        else:
            end = max(end, now)
            new = step(kind, item, now)
        for t, k, j in new:
            heapq.heappush(heap, (t, next(seq), k, j))
    start = jobs[0].arrival if jobs else 0.0
    return ReplayResult(jobs, [sim.mean_load(end) for sim in sims], end - start, decisions)
