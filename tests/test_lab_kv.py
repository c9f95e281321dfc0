"""The routing lab's KV event path: simulated caches' events, the simulated feed, index drift."""

from __future__ import annotations

import heapq
import itertools
import json
import random

from typer.testing import CliRunner

from app.cli import cli
from app.lab.drift import DriftProbe, drift_sample
from app.lab.kv_feed import KvFeedSettings, SimulatedKvFeed
from app.lab.run import run_lab
from app.lab.simulator import BlockCache, SimSettings, SimulatedReplica
from app.lab.workloads import multi_round_qa
from app.routing.index import PrefixIndex
from app.routing.kv_events import BlockRemoved, BlockStored, KvEvent

PRESSURE = SimSettings(cache_blocks=256, block_size=16)  # multi-round-qa evicts at this size


def _chains(rng: random.Random, n: int) -> list[list[int]]:
    """Chains that share prefixes (a few roots, random lengths), as prompts' block hashes do."""
    out = []
    for _ in range(n):
        root = rng.randrange(4) * 1000
        out.append([root + i for i in range(rng.randrange(1, 12))])
    return out


def test_a_caches_events_rebuild_exactly_what_it_holds():
    rng = random.Random(3)
    cache = BlockCache(capacity=10, block_size=16)
    mirror: set[int] = set()
    for chain in _chains(rng, 300):
        for event in cache.store(chain):
            if isinstance(event, BlockStored):
                assert event.token_ids is None and event.block_size == 16
                first = chain.index(event.block_hashes[0])
                assert event.parent_block_hash == (chain[first - 1] if first else None)
                assert not mirror & set(event.block_hashes)  # stored once, when new
                mirror.update(event.block_hashes)
            else:
                assert isinstance(event, BlockRemoved)
                assert set(event.block_hashes) <= mirror
                mirror.difference_update(event.block_hashes)
        assert mirror == set(cache)


def _drive(feed: SimulatedKvFeed, batches: int, gap: float = 0.01) -> None:
    """Publish `batches` batches from one replica, `gap` apart, and deliver all in time order."""
    seq = itertools.count()
    heap: list = []
    for n in range(batches):
        for t, d in feed.publish("r0", [BlockStored([n], None, None, 16)], n * gap):
            heapq.heappush(heap, (t, next(seq), d))
    while heap:
        now, _, delivery = heapq.heappop(heap)
        for t, d in feed.receive(delivery, now):
            heapq.heappush(heap, (t, next(seq), d))


def _applied(settings: KvFeedSettings, batches: int = 400) -> tuple[list[int], SimulatedKvFeed]:
    got: list[int] = []

    def apply(replica_id: str, event: KvEvent) -> None:
        assert replica_id == "r0" and isinstance(event, BlockStored)
        got.append(event.block_hashes[0])

    feed = SimulatedKvFeed(settings, apply, seed=1)
    _drive(feed, batches)
    return got, feed


def test_a_feed_without_loss_applies_every_batch_once_in_order():
    got, feed = _applied(KvFeedSettings(delay_s=0.05))
    assert got == list(range(400))
    assert (feed.stats.published, feed.stats.dropped, feed.stats.applied) == (400, 0, 400)


def test_lost_batches_are_replayed_in_order_before_later_ones():
    got, feed = _applied(KvFeedSettings(delay_s=0.05, loss=0.2))
    s = feed.stats
    assert s.dropped > 40 and s.lost == 0
    # every drop before the last delivered batch was seen as a gap and recovered, in order
    assert got == list(range(len(got)))
    assert s.replayed == s.dropped - (400 - len(got))
    assert s.applied == len(got)


def test_without_replay_a_gap_is_skipped_and_counted_lost():
    got, feed = _applied(KvFeedSettings(delay_s=0.05, loss=0.2, replay=False))
    s = feed.stats
    assert s.replayed == 0 and s.lost > 40
    assert got == sorted(got) and len(got) == 400 - s.dropped
    assert s.lost == s.dropped - (399 - got[-1])


def test_a_replay_buffer_too_small_loses_what_it_no_longer_holds():
    got, feed = _applied(KvFeedSettings(delay_s=0.05, loss=0.5, buffer_batches=1))
    assert feed.stats.lost > 0
    assert got == sorted(got) and len(set(got)) == len(got)


def test_drift_counts_stale_and_missing_entries():
    sim = SimulatedReplica("r0", SimSettings(cache_blocks=4))
    sim.cache.store([1, 2, 3])
    index = PrefixIndex()
    index.insert("r0", [1, 2, 9])  # 9 is not cached (stale); 3 is cached and not indexed
    sample = drift_sample([index], [sim])
    assert (sample.indexed, sample.stale, sample.cached, sample.missing) == (3, 1, 3, 1)
    probe = DriftProbe(lambda: [index], every=2)
    for _ in range(5):
        probe([sim])
    assert probe.result().samples == 3


def test_the_kv_policy_under_cache_pressure_and_1pct_event_loss():
    """The issue's lab target: with 1% of event batches lost, `kv` reaches 0.95 of the
    pooled-cache bound, and its index follows the caches far closer than a prediction does."""
    trace = multi_round_qa()
    scored, kv = run_lab(
        trace, ["scored", "kv"], 4, PRESSURE, kv_feed=KvFeedSettings(loss=0.01), drift_every=4
    )
    assert kv.kv_events is not None and kv.kv_events["dropped"] > 0
    assert kv.kv_events["replayed"] == kv.kv_events["dropped"]
    assert kv.hit_vs_oracle >= 0.95
    assert kv.hit_rate >= scored.hit_rate
    assert kv.index_drift is not None and scored.index_drift is not None
    assert kv.index_drift["stale_mean"] * 5 < scored.index_drift["stale_mean"]
    assert kv.index_drift["missing_mean"] * 5 < scored.index_drift["missing_mean"]


def test_kv_with_events_lost_for_good_still_routes_by_what_it_heard():
    trace = multi_round_qa()
    lossy, clean = (
        run_lab(trace, ["kv"], 4, PRESSURE, kv_feed=KvFeedSettings(loss=x, replay=False))[0]
        for x in (0.3, 0.0)
    )
    assert lossy.kv_events is not None and lossy.kv_events["lost"] > 0
    assert lossy.index_drift is not None and clean.index_drift is not None
    assert lossy.index_drift["missing_mean"] > clean.index_drift["missing_mean"]
    assert lossy.hit_rate > 0.8 * clean.hit_rate


def test_vrstack_lab_reports_the_kv_feed_and_drift():
    result = CliRunner().invoke(
        cli,
        [
            "lab",
            "--workload",
            "shared-prefix",
            "-p",
            "groups=4",
            "--replicas",
            "2",
            "--cache-blocks",
            "128",
            "--policy",
            "kv",
            "--policy",
            "prefix",
            "--kv-event-loss",
            "0.01",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["kv_feed"] == {"delay_s": 0.05, "loss": 0.01, "replay": True}
    rows = out["policies"]
    assert set(rows["kv"]["index_drift"]) >= {"stale_mean", "missing_mean", "samples"}
    assert rows["kv"]["kv_events"]["published"] > 0
    assert "kv_events" not in rows["prefix"] and "index_drift" in rows["prefix"]
    table = CliRunner().invoke(cli, ["lab", "--workload", "shared-prefix", "--policy", "kv"])
    assert table.exit_code == 0 and "event batches" in table.output
