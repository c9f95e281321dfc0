"""The KV event feed (`app.engines.kv_feed`) against vLLM's own ZMQ publisher, and the router
that routes from it.

The publisher is vLLM's `ZmqEventPublisher` (the one each engine runs); lost batches are made by
dropping its PUB sends while its replay buffer keeps them, as a network would lose them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from app.engines.kv_feed import KvFeed, Source, decode_batch
from app.engines.kv_publisher import METADATA_KEY, KvPublisher
from app.engines.router import StackRequestRouter
from app.routing import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, RequestView

kv = pytest.importorskip("vllm.distributed.kv_events", reason="needs vLLM's KV event publisher")

BS = 4  # block size of these tests


class Sink:
    """Records what the feed delivers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, Any]] = []  # (kind, replica, event or None)

    def apply(self, replica_id: str, events: Sequence[KvEvent]) -> None:
        with self.lock:
            self.log.extend(("event", replica_id, e) for e in events)

    def reset(self, replica_id: str) -> None:
        with self.lock:
            self.log.append(("reset", replica_id, None))

    def stored(self, replica_id: str = "r1") -> list[int]:
        """The first block hash of each stored event, in delivery order."""
        with self.lock:
            return [
                e.block_hashes[0]
                for kind, r, e in self.log
                if kind == "event" and r == replica_id and isinstance(e, BlockStored)
            ]

    def resets(self, replica_id: str = "r1") -> int:
        with self.lock:
            return sum(1 for kind, r, _ in self.log if kind == "reset" and r == replica_id)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def stored(n: int, parent: int | None = None) -> Any:
    return kv.BlockStored(
        block_hashes=[n],
        parent_block_hash=parent,
        token_ids=[n] * BS,
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def batch(*events: Any) -> Any:
    return kv.KVEventBatch(ts=time.time(), events=list(events))


class Publisher:
    """vLLM's publisher on fresh ports; `drop` makes its PUB lose sends (replay keeps them)."""

    def __init__(self, buffer_steps: int = 100, ports: KvPublisher | None = None) -> None:
        self.ports = ports or KvPublisher.on("127.0.0.1")
        self.pub = kv.ZmqEventPublisher(
            0,
            endpoint=f"tcp://*:{self.ports.port}",
            replay_endpoint=f"tcp://*:{self.ports.replay_port}",
            buffer_steps=buffer_steps,
        )
        self.drop = 0  # the next n sends are lost
        sock = self.pub._pub
        send = sock.send_multipart

        def lossy(frames: Any, *args: Any, **kwargs: Any) -> Any:
            if self.drop > 0:
                self.drop -= 1
                return None
            return send(frames, *args, **kwargs)

        self.pub._pub = SimpleNamespace(send_multipart=lossy, close=sock.close)
        self.sent = 0

    @property
    def source(self) -> Source:
        meta = self.ports.metadata(BS)
        return Source(meta["endpoint"], meta["replay"])

    def publish(self, *events: Any) -> None:
        self.pub.publish(batch(*events))
        self.sent += 1

    def flush(self) -> None:
        wait_for(lambda: self.pub._event_queue.qsize() == 0)
        time.sleep(0.05)

    def close(self) -> None:
        self.pub.shutdown()


@pytest.fixture
def publisher():
    made: list[Publisher] = []

    def make(**kwargs: Any) -> Publisher:
        made.append(Publisher(**kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def feed():
    made: list[KvFeed] = []

    def make(sink: Sink) -> KvFeed:
        made.append(KvFeed(sink))
        return made[-1]

    yield make
    for f in made:
        f.close()


# -- decoding ---------------------------------------------------------------------------------
def encode(*events: Any) -> bytes:
    import msgspec

    return msgspec.msgpack.Encoder().encode(batch(*events))


def test_vllm_batches_decode_into_the_routers_events() -> None:
    events = decode_batch(
        encode(
            stored(7, parent=3),
            kv.BlockRemoved(block_hashes=[b"\x01\x02"], medium="GPU"),
            kv.AllBlocksCleared(),
        )
    )
    assert events == [
        BlockStored([7], 3, [7] * BS, BS, None),
        BlockRemoved([b"\x01\x02"]),
        AllBlocksCleared(),
    ]


def test_events_of_other_tiers_groups_or_salted_blocks_are_left_out() -> None:
    offloaded = stored(1)
    offloaded.medium = "CPU"
    other_group = stored(2)
    other_group.group_idx = 1
    salted = stored(3)
    salted.extra_keys = [("salt",)]
    lora = stored(4)
    lora.lora_name = "sql"
    lora.extra_keys = [("sql",)]
    events = decode_batch(encode(offloaded, other_group, salted, lora, stored(5)))
    assert [e.block_hashes[0] for e in events] == [4, 5]
    assert events[0].lora_name == "sql"


# -- the feed -----------------------------------------------------------------------------------
def subscribed(pub: Publisher, sink: Sink, f: KvFeed, replica: str = "r1") -> None:
    """Subscribe `f` to `pub` once it published its first batch (`stored(0)`), and wait for
    it: it comes by replay, so no batch is lost while the subscription connects (a PUB
    socket drops what it sends before a subscriber is connected; a later batch would only
    show the gap then)."""
    pub.publish(stored(0))
    pub.flush()
    f.watch({replica: pub.source})
    wait_for(lambda: sink.stored(replica) == [0])
    time.sleep(0.2)  # the live subscription, connected beside the replay, settles


def test_batches_published_before_and_after_subscribing_arrive_once_in_order(
    publisher, feed
) -> None:
    pub = publisher()
    for n in range(5):  # before anyone listens: replay brings them
        pub.publish(stored(n))
    pub.flush()
    sink = Sink()
    f = feed(sink)
    f.watch({"r1": pub.source})
    wait_for(lambda: len(sink.stored()) == 5)
    for n in range(5, 20):
        pub.publish(stored(n))
    wait_for(lambda: len(sink.stored()) == 20)
    time.sleep(0.2)
    assert sink.stored() == list(range(20))
    assert sink.resets() == 0
    assert f.counts.batches == 20


def test_lost_batches_are_replayed_before_later_ones(publisher, feed) -> None:
    pub = publisher()
    subscribed(pub, sink := Sink(), f := feed(sink))
    pub.drop = 3  # 1, 2, 3 never reach the subscriber
    for n in range(1, 8):
        pub.publish(stored(n))
    wait_for(lambda: len(sink.stored()) == 8)
    time.sleep(0.2)
    assert sink.stored() == list(range(8))
    assert sink.resets() == 0
    assert f.counts.replays >= 1


def test_a_gap_the_replay_no_longer_holds_drops_the_index_and_goes_on(publisher, feed) -> None:
    pub = publisher(buffer_steps=2)
    subscribed(pub, sink := Sink(), f := feed(sink))
    pub.drop = 5  # 1..5 lost; the replay keeps only the last 2 batches
    for n in range(1, 7):
        pub.publish(stored(n))
    pub.flush()
    pub.publish(stored(7))
    wait_for(lambda: 7 in sink.stored())
    got = sink.stored()
    assert sink.resets() == 1
    assert got[0] == 0 and got == sorted(got) and len(got) == len(set(got))
    assert 1 not in got  # gone for good: not invented
    assert f.counts.resets == 1


def started_again(publisher: Callable[..., Publisher], ports: KvPublisher) -> Publisher:
    """A new publisher on a closed one's ports, once its thread has let them go."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return publisher(ports=ports)
        except zmq.ZMQError:  # still bound by the old publisher's thread
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_an_engine_that_starts_again_is_followed_from_its_first_batch(publisher, feed) -> None:
    first = publisher()
    subscribed(first, sink := Sink(), feed(sink))
    for n in range(1, 3):
        first.publish(stored(n))
    wait_for(lambda: len(sink.stored()) == 3)
    ports = first.ports
    first.close()
    second = started_again(publisher, ports)  # numbering starts at 0 again
    time.sleep(1.0)  # the subscriber reconnects (ZMQ retries every 0.1 s)
    second.publish(stored(100))
    second.publish(stored(101))
    wait_for(lambda: sink.stored()[-1:] == [101])
    assert sink.stored() == [0, 1, 2, 100, 101]
    assert sink.resets() == 1


def test_a_replica_that_leaves_is_dropped_and_the_thread_stops(publisher, feed) -> None:
    one, two = publisher(), publisher()
    one.publish(stored(1))  # before subscribing: the replay brings them (see `subscribed`)
    two.publish(stored(2))
    one.flush()
    two.flush()
    sink = Sink()
    f = feed(sink)
    f.watch({"r1": one.source, "r2": two.source})
    wait_for(lambda: sink.stored("r1") == [1] and sink.stored("r2") == [2])
    f.watch({"r2": two.source})
    wait_for(lambda: sink.resets("r1") == 1)
    assert sink.resets("r2") == 0
    f.watch({})
    wait_for(lambda: not f.running)
    f.watch({"r2": two.source})  # and starts again for new replicas
    assert f.running


def test_the_feed_stops_when_its_sink_is_gone(publisher) -> None:
    pub = publisher()
    sink = Sink()
    f = KvFeed(sink)
    f.watch({"r1": pub.source})
    del sink
    wait_for(lambda: not f.running)
    f.close()


# -- the router ---------------------------------------------------------------------------------
def make_router(publishers: dict[str, Publisher]) -> tuple[StackRequestRouter, list[Any]]:
    router = StackRequestRouter.__new__(StackRequestRouter)  # no Serve set-up needed
    router.initialize_state(policy="kv", model="m")
    replicas = [
        SimpleNamespace(
            replica_id=SimpleNamespace(unique_id=rid),
            replica_metadata={"url": f"http://127.0.0.1:{9000 + i}",
                              METADATA_KEY: pub.ports.metadata(BS)},
            routing_stats={},
            max_ongoing_requests=64,
        )
        for i, (rid, pub) in enumerate(publishers.items())
    ]  # fmt: skip
    return router, replicas


def test_the_router_routes_to_the_replica_whose_engine_reports_the_prefix(publisher) -> None:
    pubs = {"r1": publisher(), "r2": publisher()}
    router, replicas = make_router(pubs)
    try:
        prompt = list(range(100, 112))  # three blocks
        # r2's engine caches the prompt's first two blocks, as vLLM reports them (before the
        # router subscribes: the replay brings them, see `subscribed`).
        pubs["r2"].publish(
            kv.BlockStored(block_hashes=[b"a", b"b"], parent_block_hash=None,
                           token_ids=prompt[:8], block_size=BS, lora_id=None, medium="GPU",
                           lora_name=None)
        )  # fmt: skip
        pubs["r2"].flush()
        router._watch_kv_events(replicas)
        assert router._policy.block_size == BS  # the engines' block size wins
        wait_for(lambda: router.kv_counts().events == 1)
        time.sleep(0.2)  # the live subscription settles
        routed = router.route(RequestView(model="m", token_ids=prompt), candidates=replicas)
        assert routed is not None and routed.replica_id == "r2"
        assert routed.decision.reason.startswith("kv-match=")
        router.finish(routed)
        # r2's engine evicts them: the prefix is nowhere any more.
        pubs["r2"].publish(kv.BlockRemoved(block_hashes=[b"a", b"b"], medium="GPU"))
        wait_for(lambda: router.kv_counts().events == 2)
        again = router.route(RequestView(model="m", token_ids=prompt), candidates=replicas)
        assert again is not None and not again.decision.reason.startswith("kv-match=")
    finally:
        router._kv_feed.close()
