"""A SIMULATOR of the KV event feed from vLLM engines to the router, for the routing lab only.

Nothing here runs in the serving path: it carries the simulated replicas' cache events
(`app.lab.simulator`) to a policy's `on_kv_event`, with the delays, losses and recovery a real
feed has. The model, per simulated replica:

1. Publisher. Each batch of events the replica's cache produces (one per prefill, as a vLLM
   engine publishes one batch per step) gets the next sequence number (0, 1, ...) and goes into
   a replay buffer of the newest `buffer_batches` batches, as vLLM's ZMQ publisher numbers its
   batches and keeps the newest `buffer_steps` for replay.
2. Transport. A batch reaches the router `delay_s` after it was published, or is dropped with
   probability `loss` (seeded), as a PUB/SUB message can be. Batches that arrive keep their
   order (one delay for all).
3. Subscriber. It applies the batches in sequence order. A batch numbered past the next one
   expected shows a gap (a loss is seen only then: the feed has no heartbeat).
   - `replay` on: it asks the publisher for the missing numbers, which come back
     `replay_delay_s` later (those still in the buffer; the others are lost for good), and it
     holds every later batch meanwhile; then it applies the replayed batches and the held ones
     in order, as vLLM's subscriber replays a gap before going on.
   - `replay` off: the missing batches are lost for good and it goes on from the new batch.

Events are in the router's hash space (the simulated caches hold router hashes), so the
subscriber hands them on with `router_hashes=True`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from app.routing.kv_events import KvEvent


@dataclass(frozen=True, slots=True)
class KvFeedSettings:
    """The simulated feed: delivery delay and replay delay (simulated seconds; replay's None is
    `delay_s`), the fraction of batches dropped, whether gaps are replayed, the replay buffer."""

    delay_s: float = 0.05
    loss: float = 0.0
    replay: bool = True
    replay_delay_s: float | None = None
    buffer_batches: int = 10_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("the KV event loss rate is a fraction from 0 to 1")
        if self.delay_s < 0 or (self.replay_delay_s or 0.0) < 0:
            raise ValueError("KV event delays are at least 0 s")
        if self.buffer_batches < 1:
            raise ValueError("the replay buffer holds at least one batch")


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published batch: its sequence number on its replica's feed, and its events."""

    seq: int
    events: Sequence[KvEvent]


@dataclass(slots=True)
class FeedStats:
    """What happened to the batches: `published`; `dropped` on the way; of those, `replayed`
    (recovered from the replay buffer), `lost` (a gap seen and not recovered) and the rest not
    seen missing by the end; `applied` (handed to the router)."""

    published: int = 0
    dropped: int = 0
    replayed: int = 0
    lost: int = 0
    applied: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Live:
    replica_id: str
    batch: EventBatch


@dataclass(frozen=True, slots=True)
class _Replayed:
    replica_id: str
    batches: list[EventBatch]
    upto: int  # the gap's end: the number of the batch that showed it


@dataclass(slots=True)
class _Subscriber:
    expected: int = 0  # the next sequence number to apply
    waiting: bool = False  # a replay is on its way
    held: list[EventBatch] = field(default_factory=list)  # arrived during a replay


class SimulatedKvFeed:
    """The simulated feed of every replica (see the module doc). `apply(replica_id, event)`
    takes each event the subscriber applies. Used as `replay(..., feed=...)`'s `EventFeed`."""

    def __init__(
        self,
        settings: KvFeedSettings,
        apply: Callable[[str, KvEvent], None],
        seed: int = 0,
    ) -> None:
        self.s = settings
        self._apply = apply
        self._rng = random.Random(seed)
        self._replay_delay = (
            settings.delay_s if settings.replay_delay_s is None else settings.replay_delay_s
        )
        self._buffers: dict[str, deque[EventBatch]] = {}
        self._subscribers: dict[str, _Subscriber] = {}
        self.stats = FeedStats()

    def publish(
        self, replica_id: str, events: list[KvEvent], now: float
    ) -> list[tuple[float, Any]]:
        """Number a replica's batch, buffer it, and send it (or drop it)."""
        buffer = self._buffers.get(replica_id)
        if buffer is None:
            buffer = self._buffers[replica_id] = deque(maxlen=self.s.buffer_batches)
        batch = EventBatch(buffer[-1].seq + 1 if buffer else 0, tuple(events))
        buffer.append(batch)
        self.stats.published += 1
        if self.s.loss and self._rng.random() < self.s.loss:
            self.stats.dropped += 1
            return []
        return [(now + self.s.delay_s, _Live(replica_id, batch))]

    def receive(self, delivery: Any, now: float) -> list[tuple[float, Any]]:
        """A live batch or a replay reaches the subscriber."""
        sub = self._subscribers.get(delivery.replica_id)
        if sub is None:
            sub = self._subscribers[delivery.replica_id] = _Subscriber()
        if isinstance(delivery, _Live):
            if sub.waiting:
                sub.held.append(delivery.batch)
                return []
            return self._take(delivery.replica_id, sub, delivery.batch, now)
        assert isinstance(delivery, _Replayed)
        for batch in delivery.batches:
            if batch.seq >= sub.expected:
                self._apply_batch(delivery.replica_id, batch)
                self.stats.replayed += 1
        sub.expected = max(sub.expected, delivery.upto)  # what did not come back is lost
        sub.waiting = False
        held, sub.held = sub.held, []
        for i, batch in enumerate(held):
            out = self._take(delivery.replica_id, sub, batch, now)
            if sub.waiting:  # another gap: hold the rest behind this replay too
                sub.held += held[i + 1 :]
                return out
        return []

    def _take(
        self, replica_id: str, sub: _Subscriber, batch: EventBatch, now: float
    ) -> list[tuple[float, Any]]:
        """Apply the next batch in order; on a gap, ask for a replay or give the gap up."""
        if batch.seq < sub.expected:  # already applied
            return []
        if batch.seq > sub.expected:
            if self.s.replay:
                buffer = self._buffers[replica_id]
                first = buffer[0].seq
                found = [buffer[n - first] for n in range(max(sub.expected, first), batch.seq)]
                self.stats.lost += batch.seq - sub.expected - len(found)
                sub.waiting, sub.held = True, [batch]
                return [(now + self._replay_delay, _Replayed(replica_id, found, batch.seq))]
            self.stats.lost += batch.seq - sub.expected
        self._apply_batch(replica_id, batch)
        sub.expected = batch.seq + 1
        return []

    def _apply_batch(self, replica_id: str, batch: EventBatch) -> None:
        for event in batch.events:
            self._apply(replica_id, event)
        self.stats.applied += 1
