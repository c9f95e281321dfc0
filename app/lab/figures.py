"""The lab's figures for one replay."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from app.lab.simulator import ReplayResult


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class LabFigures:
    """Per-policy results of a replay (simulated)."""

    policy: str
    requests: int
    hit_rate: float
    ttft_p50_s: float
    ttft_p99_s: float
    throughput_rps: float
    output_tps: float
    load_imbalance: float
    oracle_hit_rate: float
    hit_vs_oracle: float
    reasons: dict[str, int]
    index_drift: dict[str, float | int] | None = None  # `app.lab.drift`, for indexed policies
    kv_events: dict[str, int] | None = None  # `app.lab.kv_feed.FeedStats`, for `kv`

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4)
        return out


def figures(policy: str, result: ReplayResult, oracle: float) -> LabFigures:
    """Hit rate, TTFT p50/p99, throughput, load imbalance (max/mean of time-averaged in-flight)."""
    jobs = result.jobs
    prompt = sum(j.prompt_tokens for j in jobs)
    cached = sum(j.cached_tokens for j in jobs)
    ttfts = [j.ttft for j in jobs]
    loads = result.mean_loads
    mean_load = sum(loads) / len(loads) if loads else 0.0
    span = result.makespan or 1.0
    hit = cached / prompt if prompt else 0.0
    return LabFigures(
        policy=policy,
        requests=len(jobs),
        hit_rate=hit,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        throughput_rps=len(jobs) / span,
        output_tps=sum(j.max_tokens for j in jobs) / span,
        load_imbalance=max(loads) / mean_load if mean_load > 0 else 1.0,
        oracle_hit_rate=oracle,
        hit_vs_oracle=hit / oracle if oracle > 0 else 1.0,
        reasons=dict(Counter(d.reason_kind for d in result.decisions)),
    )
