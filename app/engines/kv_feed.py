"""Engine replicas' KV cache events, fed to a router: one subscriber thread per router.

Each engine replica's vLLM publishes its KV cache events over ZMQ: numbered batches on a PUB
socket, and a replay socket that resends the last batches it keeps (`app.engines.kv_publisher`).
`KvFeed` subscribes to every replica its router names, decodes each batch into
`app.routing.kv_events` and hands the events to a `KvSink` (the router, which applies them to
its policy), in order and once each:

1. On subscribing, it asks the replica's replay socket for every batch from the first: those
   published before the subscription took effect (ZMQ's slow joiner).
2. A batch whose number skips ahead means batches were lost on the way: it asks for the missing
   ones by replay, holding later batches until they are in.
3. When the replay no longer holds them (vLLM keeps its last `buffer_steps` batches), or the
   replay socket does not answer, the replica's index is dropped (`KvSink.reset`) and rebuilt
   from the batches that follow: blocks the engine held before count as misses until stored
   again, never as hits that are not there.
4. A batch numbered 0 after others: the engine started again; its index is dropped too.
5. A replica the router no longer names is unsubscribed and dropped.

Plain Python and pyzmq: no Ray or vLLM imports (the wire format is decoded with msgspec).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import zmq

from app.routing.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

logger = logging.getLogger("vrstack.kv")

END_SEQ = -1  # the replay socket's "no more" marker (vLLM's `ZmqEventPublisher.END_SEQ`)
REPLAY_TIMEOUT_S = 5.0  # a replay socket silent this long is given up on (step 3)
POLL_S = 0.1


class KvSink(Protocol):
    """Where a feed delivers a replica's events (the router)."""

    def apply(self, replica_id: str, events: Sequence[KvEvent]) -> None:
        """Apply one batch of a replica's events, in order."""
        ...

    def reset(self, replica_id: str) -> None:
        """Drop what is known of a replica's cache (rebuilt from later events)."""
        ...


@dataclass(frozen=True, slots=True)
class Source:
    """Where one replica publishes: its PUB and replay endpoints (`tcp://host:port`)."""

    endpoint: str
    replay: str | None = None

    @classmethod
    def of(cls, metadata: Mapping[str, object]) -> Source | None:
        """From a replica's `kv_events` metadata; None when it publishes nothing."""
        endpoint = metadata.get("endpoint")
        replay = metadata.get("replay")
        if not isinstance(endpoint, str):
            return None
        return cls(endpoint, replay if isinstance(replay, str) else None)


# -- vLLM's wire format (vllm.distributed.kv_events), the fields used here -----------------------
class _Stored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list | None] | None = None
    group_idx: int | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_Stored | _Removed | _Cleared]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(_Batch)


def decode_batch(payload: bytes) -> list[KvEvent]:
    """One published batch as `app.routing.kv_events`, keeping the device cache's events of the
    first KV cache group (offload tiers and other groups are not the engine's prefix cache);
    a stored block that hashes more than its tokens (a cache salt, an image) is left out."""
    events: list[KvEvent] = []
    for event in _decoder.decode(payload).events:
        if isinstance(event, _Cleared):
            events.append(AllBlocksCleared())
        elif not _device_cache(event.medium, event.group_idx):
            continue
        elif isinstance(event, _Removed):
            events.append(BlockRemoved(event.block_hashes))
        elif not _salted(event):
            events.append(
                BlockStored(
                    event.block_hashes,
                    event.parent_block_hash,
                    event.token_ids,
                    event.block_size,
                    event.lora_name,
                )
            )
    return events


def _device_cache(medium: str | None, group: int | None) -> bool:
    return medium in (None, "GPU") and not group


def _salted(event: _Stored) -> bool:
    """Extra hash keys beyond a LoRA adapter's name (which the router hashes itself)."""
    return any(keys and list(keys) != [event.lora_name] for keys in event.extra_keys or ())


# -- the subscriber -----------------------------------------------------------------------------
@dataclass(slots=True)
class FeedCounts:
    """What a feed has done, for /metrics (monotonic)."""

    batches: int = 0
    events: int = 0
    replays: int = 0  # gaps asked to be filled by replay (step 2)
    resets: int = 0  # indexes dropped (steps 3 and 4)


@dataclass(slots=True)
class _Replica:
    source: Source
    sub: zmq.Socket
    replay: zmq.Socket | None
    next: int = 0  # the next batch number expected
    replaying_since: float | None = None  # a replay asked and not ended
    held: list[tuple[int, bytes]] = field(default_factory=list)  # live batches during a replay
    tries: int = 0  # replays in a row that left a gap


class KvFeed:
    """Subscribes to replicas' KV event publishers and feeds a sink (see the module docstring).

    `watch(sources)` names the replicas to follow (replica id -> `Source`). The thread runs while
    there are replicas to follow and its sink lives (it holds the sink weakly); `close()` stops
    it for good."""

    def __init__(self, sink: KvSink, name: str = "kv-feed") -> None:
        self._sink = weakref.ref(sink)
        self._name = name
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._wanted: dict[str, Source] = {}
        self._changed = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.counts = FeedCounts()

    def watch(self, sources: Mapping[str, Source]) -> None:
        """Follow exactly these replicas (others are unsubscribed and reset)."""
        with self._lock:
            self._wanted = dict(sources)
            self._changed.set()
            if self._wanted and self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close the sockets."""
        self._closed.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._ctx.destroy(linger=0)

    @property
    def running(self) -> bool:
        """Whether the subscriber thread runs."""
        return self._thread is not None

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        replicas: dict[str, _Replica] = {}
        poller = zmq.Poller()
        try:
            while not self._closed.is_set() and self._sink() is not None:
                if self._changed.is_set():
                    with self._lock:
                        self._changed.clear()
                        if not self._wanted and not replicas:
                            self._thread = None  # nothing to follow: a later watch restarts
                            return
                    self._sync(replicas, poller)
                ready = dict(poller.poll(POLL_S * 1000))
                for replica_id, replica in list(replicas.items()):
                    if replica.replay is not None and replica.replay in ready:
                        self._on_replay(replica_id, replica)
                    if replica.sub in ready:
                        self._on_live(replica_id, replica)
                    self._check_replay(replica_id, replica)
        except Exception:  # a feed that fails must not take the router with it
            logger.exception("KV event feed stopped")
        finally:
            for replica in replicas.values():
                _close(replica)
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _sync(self, replicas: dict[str, _Replica], poller: zmq.Poller) -> None:
        wanted = self._wanted
        for replica_id in [r for r in replicas if wanted.get(r) != replicas[r].source]:
            replica = replicas.pop(replica_id)
            for sock in (replica.sub, replica.replay):
                if sock is not None:
                    poller.unregister(sock)
            _close(replica)
            self._tell_reset(replica_id)
        if not wanted:
            self._changed.set()  # leave on the next turn, unless replicas come back
        for replica_id, source in wanted.items():
            if replica_id in replicas:
                continue
            sub = self._ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(source.endpoint)
            poller.register(sub, zmq.POLLIN)
            replay = None
            if source.replay:
                replay = self._ctx.socket(zmq.DEALER)
                replay.connect(source.replay)
                poller.register(replay, zmq.POLLIN)
            replica = replicas[replica_id] = _Replica(source, sub, replay)
            self._ask_replay(replica_id, replica)  # step 1

    def _on_live(self, replica_id: str, replica: _Replica) -> None:
        while True:
            try:
                _topic, seq_bytes, payload = replica.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if replica.replaying_since is not None:
                replica.held.append((seq, payload))
            elif seq == replica.next:
                self._deliver(replica_id, replica, seq, payload)
            elif seq == 0:  # step 4: the engine started again
                self._reset(replica_id, replica, 0)
                self._deliver(replica_id, replica, seq, payload)
            elif seq > replica.next:  # step 2: a gap
                replica.held.append((seq, payload))
                self.counts.replays += 1
                self._ask_replay(replica_id, replica)

    def _on_replay(self, replica_id: str, replica: _Replica) -> None:
        assert replica.replay is not None
        while True:
            try:
                frames = replica.replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 4:
                continue
            _empty, _topic, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if seq == END_SEQ:
                self._replayed(replica_id, replica)
            elif seq >= replica.next and replica.replaying_since is not None:
                if seq > replica.next:  # step 3: the replay no longer holds the gap
                    self._reset(replica_id, replica, seq)
                self._deliver(replica_id, replica, seq, payload)

    def _replayed(self, replica_id: str, replica: _Replica) -> None:
        """The replay ended: deliver the batches held meanwhile, or ask again for a gap
        before them (published between the replay and the subscription)."""
        replica.replaying_since = None
        held = sorted(replica.held)
        replica.held = []
        for at, (seq, payload) in enumerate(held):
            if seq < replica.next:
                continue
            if seq > replica.next:
                if replica.tries < 2:
                    replica.held = held[at:]
                    self._ask_replay(replica_id, replica)
                    return
                self._reset(replica_id, replica, seq)
            self._deliver(replica_id, replica, seq, payload)
        replica.tries = 0

    def _check_replay(self, replica_id: str, replica: _Replica) -> None:
        """Step 3 for a replay socket that does not answer."""
        since = replica.replaying_since
        if since is None or time.monotonic() - since < REPLAY_TIMEOUT_S:
            return
        logger.warning("KV events of replica %s: no replay answer; index rebuilt", replica_id)
        replica.replaying_since = None
        held = sorted(replica.held)
        replica.held = []
        if held:
            self._reset(replica_id, replica, held[0][0])
        for seq, payload in held:
            if seq >= replica.next:
                self._deliver(replica_id, replica, seq, payload)

    def _ask_replay(self, replica_id: str, replica: _Replica) -> None:
        if replica.replay is None:  # nothing to ask: start from what comes
            if replica.held:
                seq, payload = replica.held.pop()
                self._reset(replica_id, replica, seq)
                self._deliver(replica_id, replica, seq, payload)
            return
        replica.tries += 1
        replica.replaying_since = time.monotonic()
        with contextlib.suppress(zmq.Again):  # not connected: step 3's time-out applies
            replica.replay.send_multipart((b"", replica.next.to_bytes(8, "big")), zmq.NOBLOCK)

    def _deliver(self, replica_id: str, replica: _Replica, seq: int, payload: bytes) -> None:
        try:
            events = decode_batch(payload)
        except msgspec.DecodeError:
            logger.warning("KV events of replica %s: batch %d not understood", replica_id, seq)
            events = []
        replica.next = seq + 1
        self.counts.batches += 1
        self.counts.events += len(events)
        sink = self._sink()
        if events and sink is not None:
            sink.apply(replica_id, events)

    def _reset(self, replica_id: str, replica: _Replica, next_seq: int) -> None:
        if replica.next or next_seq:
            self.counts.resets += 1
        replica.next = next_seq
        self._tell_reset(replica_id)

    def _tell_reset(self, replica_id: str) -> None:
        sink = self._sink()
        if sink is not None:
            sink.reset(replica_id)


def _close(replica: _Replica) -> None:
    replica.sub.close(linger=0)
    if replica.replay is not None:
        replica.replay.close(linger=0)
