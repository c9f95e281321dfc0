"""Statistics of a `vrstack bench` run: pure functions over per-request records.

Latencies are in seconds; percentiles interpolate linearly between closest ranks (numpy's
default "linear" method): rank = q / 100 * (n - 1).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """One request's outcome. `status` is "ok" or the error label (HTTP status or exception)."""

    start: float  # seconds since the run began
    status: str = "ok"
    e2e: float | None = None  # end-to-end latency
    ttft: float | None = None  # time to the first chunk carrying text (streaming only)
    itl: list[float] = field(default_factory=list)  # gaps between text chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    user: str | None = None
    round: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("start", "e2e", "ttft"):
            if out[k] is not None:
                out[k] = round(out[k], 6)
        out["itl"] = [round(x, 6) for x in self.itl]
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """count, mean, p50, p90, p99 and max of values."""
    return {
        "count": len(values),
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


def errors_by_status(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests counted by status label, sorted by label."""
    counts = Counter(r.status for r in records if not r.ok)
    return dict(sorted(counts.items()))


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The run's summary: counts, throughput and latency distributions of successful requests."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        "requests": len(records),
        "succeeded": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_status": errors_by_status(records),
        "duration_s": duration_s,
        "requests_per_s": per_s(len(ok)),
        "output_tokens": out_tokens,
        "output_tokens_per_s": per_s(out_tokens),
        "tokens_from_usage": sum(r.tokens_from_usage for r in ok),
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": distribution([g for r in ok for g in r.itl]),
        "e2e_s": distribution([r.e2e for r in ok if r.e2e is not None]),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict[str, Any], title: str = "vrstack bench") -> str:
    """A markdown report of a summary (latencies in ms)."""
    lines = [
        f"## {title}",
        "",
        "| requests | ok | failed | duration (s) | req/s | output tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {summary['requests']} | {summary['succeeded']} | {summary['failed']} "
        f"| {_num(summary['duration_s'])} | {_num(summary['requests_per_s'])} "
        f"| {_num(summary['output_tokens_per_s'], 1)} |",
        "",
        "| latency (ms) | n | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        d = summary[key]
        lines.append(
            f"| {name} | {d['count']} | {_ms(d['mean'])} | {_ms(d['p50'])} | {_ms(d['p90'])} "
            f"| {_ms(d['p99'])} | {_ms(d['max'])} |"
        )
    errors = summary["errors_by_status"]
    if errors:
        lines += ["", "| error | count |", "|---|---:|"]
        lines += [f"| {status} | {n} |" for status, n in errors.items()]
    return "\n".join(lines) + "\n"
