"""Run the lab: replay one trace under several policies and compare with the oracle.

Policies with a prefix index in the router's hash space (`prefix`, `scored`, `kv`) also get the
index's drift from the simulated caches (`app.lab.drift`). The `kv` policy is fed the simulated
replicas' KV events through a simulated feed (`app.lab.kv_feed`: delay, loss, replay); a
simulated replica serves every model of the trace from one cache, so its events go to the index
of each of the trace's models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.lab.drift import DriftProbe
from app.lab.figures import LabFigures, figures
from app.lab.kv_feed import KvFeedSettings, SimulatedKvFeed
from app.lab.oracle import pooled_oracle
from app.lab.peers import PEERS
from app.lab.simulator import SimSettings, replay
from app.lab.trace import TraceRequest
from app.routing import POLICY_NAMES, KvPolicy, make_policy
from app.routing.kv_events import KvEvent
from app.routing.policies import IndexedPolicy

LAB_POLICIES: tuple[str, ...] = POLICY_NAMES + tuple(PEERS)


def lab_policy(name: str, settings: SimSettings, seed: int = 0) -> Any:
    """Our policy or a peer re-implementation, sized to the simulated replicas."""
    if name in PEERS:
        return PEERS[name](seed=seed)
    if name in ("prefix", "scored", "kv"):
        return make_policy(name, block_size=settings.block_size, max_blocks=settings.cache_blocks)
    if name in ("power_of_two", "session"):
        return make_policy(name, seed=seed)
    return make_policy(name)


def kv_feed_for(
    policy: KvPolicy, models: Sequence[str], settings: KvFeedSettings, seed: int = 0
) -> SimulatedKvFeed:
    """A simulated feed applying each replica's events to the policy's index of every model."""

    def apply(replica_id: str, event: KvEvent) -> None:
        for model in models:
            policy.on_kv_event(model, replica_id, event, router_hashes=True)

    return SimulatedKvFeed(settings, apply, seed)


def run_lab(
    requests: Sequence[TraceRequest],
    policies: Sequence[str],
    replicas: int,
    settings: SimSettings,
    seed: int = 0,
    kv_feed: KvFeedSettings | None = None,
    drift_every: int = 1,
) -> list[LabFigures]:
    """Figures for each policy on the same trace and simulated replicas; `kv_feed` shapes the
    `kv` policy's event feed (default `KvFeedSettings()`), `drift_every` the drift sampling."""
    allowed = set(LAB_POLICIES)
    for name in policies:
        if name not in allowed:
            raise ValueError(f"unknown lab policy {name!r}; allowed: {', '.join(LAB_POLICIES)}")
    views = [r.view() for r in requests]
    oracle = pooled_oracle(views, replicas * settings.cache_blocks, settings.block_size)
    models = sorted({r.model for r in requests})
    out = []
    for name in policies:
        fresh = [r.view() for r in requests]
        for v, old in zip(fresh, views, strict=True):
            v._hashes = old._hashes  # share computed hashes; they depend only on the prompt
        policy = lab_policy(name, settings, seed)
        probe = feed = None
        if isinstance(policy, IndexedPolicy):
            probe = DriftProbe(lambda p=policy: [p.index(m) for m in models], drift_every)
        if isinstance(policy, KvPolicy):
            feed = kv_feed_for(policy, models, kv_feed or KvFeedSettings(), seed)
        result = replay(requests, policy, replicas, settings, fresh, feed=feed, observe=probe)
        row = figures(name, result, oracle)
        if probe is not None:
            row.index_drift = probe.result().to_json()
        if feed is not None:
            row.kv_events = feed.stats.to_json()
        out.append(row)
    return out
