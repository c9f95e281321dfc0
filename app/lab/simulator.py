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

With `priority_scheduling` (vLLM's `scheduling_policy: priority`), prefills go in the order of
the requests' `priority` (lower first, then arrival), and a more important request's prefill
pauses a less important one's (vLLM schedules step by step, a long prompt's prefill in chunks).

An admission rule may preempt a request (`Admission.preempt`, as a gateway that stops a stream
and later continues it from its tokens): its slot is freed at once, the tokens it produced are
kept, and when the rule dispatches it again its prompt and those tokens are prefilled anew (the
prompt's blocks may still be cached) before it decodes the rest. Its TTFT stays that of its
first dispatch.

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
    priority_scheduling: bool = False


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
    priority: int = 0  # what it carries to the engine (its latest dispatch's)
    dispatched: float = -1.0  # when it was dispatched (its latest dispatch)
    generated: int = 0  # output tokens produced before preemptions
    decode_start: float = -1.0  # when its current decode began (-1: not decoding)
    # Its prefill's and its decode's scheduled ends (-1: none); an event for another time is
    # stale (the prefill was paused, the request preempted).
    prefill_due: float = -1.0
    due: float = -1.0
    prefill_left: float = -1.0  # what is left of a paused prefill (s)
    preemptions: int = 0

    @property
    def remaining(self) -> int:
        """Output tokens still to produce."""
        return max(0, self.max_tokens - self.generated)


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
        current = self.prefilling
        if current is None:
            return self._next_prefill(now)
        if self.s.priority_scheduling and job.priority < current.priority:
            current.prefill_left, current.prefill_due = current.prefill_due - now, -1.0
            self.prefill_queue.appendleft(current)
            return self._next_prefill(now)
        return []

    def _next_prefill(self, now: float) -> list[tuple[float, str, _Job]]:
        if not self.prefill_queue:
            self.prefilling = None
            return []
        if self.s.priority_scheduling:
            job = min(self.prefill_queue, key=lambda j: j.priority)  # the first of the most
            self.prefill_queue.remove(job)  # important ones
        else:
            job = self.prefill_queue.popleft()
        self.prefilling = job
        if job.prefill_left >= 0:  # a paused one goes on
            job.prefill_due, job.prefill_left = now + job.prefill_left, -1.0
            return [(job.prefill_due, "prefilled", job)]
        cached = self.cached_prefix(job.hashes)
        job.cached_tokens = min(job.prompt_tokens, cached * self.s.block_size)
        uncached = job.prompt_tokens + job.generated - job.cached_tokens  # a resumed one's too
        job.prefill_due = now + self.s.prefill_overhead + self.s.prefill_cost * uncached
        return [(job.prefill_due, "prefilled", job)]

    def backlog(self, priority: int) -> int:
        """Prompt tokens waiting for or in their prefill among requests of `priority` or more
        important ones."""
        queued = [*self.prefill_queue, *([self.prefilling] if self.prefilling else [])]
        return sum(j.prompt_tokens + j.generated for j in queued if j.priority <= priority)

    def prefilled(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        job.prefill_due = -1.0
        if not job.ttft:  # its first prefill's end (a resumed one's first token came before)
            job.ttft = now - job.arrival
        events = self.cache.store(job.hashes)
        if self.publish_events and events:
            self.outbox.append(events)
        job.decode_start, job.due = now, now + self.s.decode_cost * job.remaining
        return [(job.due, "finished", job), *self._next_prefill(now)]

    def preempt(self, job: _Job, now: float) -> list[tuple[float, str, _Job]]:
        """Stop a job that is decoding or waiting for its prefill (not in it): keep the tokens
        it produced, free its slot (the next waiting job takes it); its pending event goes
        stale. A paused prefill starts again when the job is dispatched again."""
        self._account(now)
        if job.decode_start >= 0:
            job.generated += min(job.remaining, int((now - job.decode_start) / self.s.decode_cost))
        else:
            self.prefill_queue.remove(job)
        job.preemptions += 1
        job.decode_start = job.due = job.prefill_left = -1.0
        self.running.remove(job)
        self._held_blocks -= len(job.hashes)
        return self._admit(self.waiting.popleft(), now) if self.waiting else []

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

    A rule with an `engine_priority(index)` method sets the `priority` a request carries to
    the engine (else the request's own). A rule with a `preempt(now, running, backlog)` method
    is asked, when no slot is free, which requests (`Running`: those not in their prefill) to
    stop; `backlog(replica, priority)` is a replica's prompt tokens waiting for or in their
    prefill at `priority` or more important. Each one stopped is the rule's to dispatch again.
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


@dataclass(frozen=True, slots=True)
class Running:
    """A dispatched request not in its prefill, as a preempting admission rule sees it."""

    index: int
    replica: int
    priority: int  # what it carries to the engine
    dispatched: float  # when it was dispatched (its latest dispatch)


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

    preempt = getattr(admission, "preempt", None)
    engine_priority = getattr(admission, "engine_priority", None)

    def backlog(replica: int, priority: int) -> int:
        return sims[replica].backlog(priority)

    def dispatch(job: _Job, now: float, pool: list[SimulatedReplica]) -> list:
        if observe is not None:
            observe(sims)
        job.priority = (
            engine_priority(job.index) if engine_priority else requests[job.index].priority
        )
        decision = policy.choose(job.view, [sim.stats() for sim in pool])
        decisions.append(decision)
        job.replica = index_of[decision.replica_id]
        job.dispatched = now
        return sims[job.replica].submit(job, now)

    def admit(now: float) -> list[tuple[float, str, _Job]]:
        """Dispatch what `admission` names (a gated rule's only to replicas with a free slot);
        with no slot free, stop what a preempting rule names and go on."""
        assert admission is not None
        out: list[tuple[float, str, _Job]] = []
        while True:
            free = [sim for sim in sims if len(sim.running) + len(sim.waiting) < s.max_concurrency]
            slots = sum(s.max_concurrency - len(sim.running) - len(sim.waiting) for sim in free)
            index = admission.next(now, slots)
            if index is not None:
                out += dispatch(jobs[index], now, free if admission.gated and free else sims)
                continue
            if slots or preempt is None:
                return out
            running = [
                Running(j.index, j.replica, j.priority, j.dispatched)
                for sim in sims
                for j in sim.running
                if j is not sim.prefilling
            ]
            victims = preempt(now, running, backlog)
            if not victims:
                return out
            for victim in victims:
                policy.on_complete(jobs[victim].view, sims[jobs[victim].replica].replica_id)
                out += sims[jobs[victim].replica].preempt(jobs[victim], now)

    def step(kind: str, job: _Job, now: float) -> list[tuple[float, str, Any]]:
        """One request's event: its arrival, the end of its prefill, or its completion."""
        if kind == "arrive":
            if admission is None:
                return dispatch(job, now, sims)
            return admit(now) if admission.arrive(job.index, requests[job.index], now) else []
        sim = sims[job.replica]
        if now != (job.due if kind == "finished" else job.prefill_due):
            return []  # stale: its prefill paused, or it was preempted, since
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
