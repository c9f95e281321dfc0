"""Run the lab: replay one trace under several policies and compare with the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.lab.figures import LabFigures, figures
from app.lab.oracle import pooled_oracle
from app.lab.peers import PEERS
from app.lab.simulator import SimSettings, replay
from app.lab.trace import TraceRequest
from app.routing import POLICY_NAMES, make_policy

LAB_POLICIES: tuple[str, ...] = tuple(p for p in POLICY_NAMES if p != "kv") + tuple(PEERS)


def lab_policy(name: str, settings: SimSettings, seed: int = 0) -> Any:
    """Our policy or a peer re-implementation, sized to the simulated replicas."""
    if name in PEERS:
        return PEERS[name](seed=seed)
    if name in ("prefix", "scored"):
        return make_policy(name, block_size=settings.block_size, max_blocks=settings.cache_blocks)
    if name in ("power_of_two", "session"):
        return make_policy(name, seed=seed)
    if name == "kv":
        raise ValueError("the kv policy needs engine KV events; the lab replays without them")
    return make_policy(name)


def run_lab(
    requests: Sequence[TraceRequest],
    policies: Sequence[str],
    replicas: int,
    settings: SimSettings,
    seed: int = 0,
) -> list[LabFigures]:
    """Figures for each policy on the same trace and simulated replicas."""
    allowed = set(LAB_POLICIES)
    for name in policies:
        if name not in allowed:
            raise ValueError(f"unknown lab policy {name!r}; allowed: {', '.join(LAB_POLICIES)}")
    views = [r.view() for r in requests]
    oracle = pooled_oracle(views, replicas * settings.cache_blocks, settings.block_size)
    out = []
    for name in policies:
        fresh = [r.view() for r in requests]
        for v, old in zip(fresh, views, strict=True):
            v._hashes = old._hashes  # share computed hashes; they depend only on the prompt
        result = replay(requests, lab_policy(name, settings, seed), replicas, settings, fresh)
        out.append(figures(name, result, oracle))
    return out
