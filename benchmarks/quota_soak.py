"""A quota soak: tenants pushing past their quotas through several ingress replicas for minutes.

`python -m benchmarks.quota_soak --minutes 10` starts an in-process Ray cluster in the stack's
high-throughput mode (`benchmarks.overhead.serve_cluster`; loopback only) with the stack in front
of `SimulatedEngine` replicas, `--ingress-replicas` ingress replicas (HAProxy spreads the
connections over them) and `--tenants` tenants, each with a `tokens_per_minute` and a
`requests_per_second` quota. Each tenant's `--concurrency` clients send completions back to back
(a share of them streamed with `include_usage`), each a fresh connection so HAProxy spreads them,
and pause 50-150 ms after a 429.

Every answered request is recorded with the time it was sent and the tokens its answer's `usage`
reports (prompt + completion: what the tenant is charged once settled). The report checks, per
tenant, the quotas' own bound over every window of the run (`token_bucket_excess`: the most any
window admitted beyond a full bucket plus the window's refill, as a share of the quota; at most 0
when the quota holds exactly; `request_excess` likewise for requests) and the tenant's rate over
the run beyond the bucket it starts with, `(tokens - tokens_per_minute) / minutes` as a share of
`tokens_per_minute` (`long_run_ratio`; target <= 1.01). Also reported, not a target: the most
tokens admitted in any 60-second window once the first minute's bucket is spent, as a share of
the quota (`steady_minute_ratio`): a token bucket lets a window take back what the one before
left unspent, and a request is placed at the time it was sent, not admitted (up to 1 s before,
when it waited for the ledger), so it runs a few percent above 1 with the quota held.
The run stops its Ray cluster and everything it started by itself, also on Ctrl-C or SIGTERM; it
exits 1 when a quota was exceeded beyond the target or a request failed (5xx).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.bench.load import words
from benchmarks.command import main, report_options, settings
from benchmarks.overhead import MODEL, serve_cluster

APP_NAME = "quota-soak"
TARGET = 1.01  # the most a tenant may get over the run, as a share of tokens_per_minute


@dataclass(slots=True)
class TenantLog:
    """What one tenant's clients saw: answered requests as (sent at, tokens charged)."""

    name: str
    key: str
    admitted: list[tuple[float, int]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)


def request_excess(times: Sequence[float], rate: float, burst: float) -> float:
    """The most requests any window admitted beyond `burst + rate x its length` (<= 0: the
    token bucket of `requests_per_second` held). `times` sorted."""
    worst, best_start = -burst, -float("inf")
    for j, t in enumerate(times):
        best_start = max(best_start, rate * t - j)  # the window's start i maximises this
        worst = max(worst, best_start + j + 1 - rate * t - burst)
    return worst


def token_excess(events: Sequence[tuple[float, int]], per_minute: float) -> float:
    """The most tokens any window admitted beyond a full bucket (`per_minute`) plus the window's
    refill, as a share of `per_minute` (<= 0: the quota held). `events` sorted by time."""
    rate = per_minute / 60
    worst, best_start, before = -1.0, -float("inf"), 0
    for t, tokens in events:
        best_start = max(best_start, rate * t - before)  # tokens admitted before the start
        before += tokens
        worst = max(worst, (best_start + before - rate * t - per_minute) / per_minute)
    return worst


def steady_minute_ratio(
    events: Sequence[tuple[float, int]], per_minute: float, start_s: float, window_s: float = 60
) -> float | None:
    """The most tokens admitted in any `window_s` window starting at or after `start_s` (when
    the first full bucket is spent), divided by the window's share of the quota; None when
    the run is shorter than one such window."""
    times = [t for t, _ in events]
    if not events or times[-1] - start_s < window_s:
        return None
    sums = [0]
    for _, tokens in events:
        sums.append(sums[-1] + tokens)
    worst = 0
    for i in range(bisect.bisect_left(times, start_s), len(events)):
        if times[i] + window_s > times[-1]:
            break
        j = bisect.bisect_left(times, times[i] + window_s)
        worst = max(worst, sums[j] - sums[i])
    return worst / (per_minute * window_s / 60)


def long_run_ratio(tokens: int, per_minute: float, duration_s: float) -> float:
    """Tokens admitted over the run beyond the full bucket it starts with, per minute, as a
    share of `per_minute` (<= 1: the tenant got no more than its rate)."""
    return (tokens - per_minute) / (duration_s / 60) / per_minute


def stream_usage(text: str) -> int:
    """Prompt + completion tokens of a stream's usage chunk (0 without one)."""
    for line in reversed(text.splitlines()):
        if line.startswith("data: {") and '"usage"' in line:
            usage = json.loads(line[6:]).get("usage") or {}
            return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    return 0


async def client_loop(
    a: argparse.Namespace, base: str, log: TenantLog, rng: random.Random, until: float, t0: float
) -> None:
    """One client of a tenant: completions back to back until `until`, a new connection each."""
    headers = {"authorization": f"Bearer {log.key}"}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as c:
        while time.monotonic() < until:
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": words(rng, rng.randint(8, 64)),
                "max_tokens": rng.randint(4, a.max_tokens),
            }
            if rng.random() < a.stream_share:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            sent = time.monotonic() - t0
            try:
                response = await c.post("/v1/completions", json=body)
            except httpx.HTTPError:
                log.statuses["connection-error"] += 1
                continue
            log.statuses[response.status_code] += 1
            if response.status_code == 200:
                usage = (
                    stream_usage(response.text)
                    if body.get("stream")
                    else sum(
                        int(response.json()["usage"].get(k, 0))
                        for k in ("prompt_tokens", "completion_tokens")
                    )
                )
                log.admitted.append((sent, usage))
            elif response.status_code == 429:
                await asyncio.sleep(0.05 + 0.1 * rng.random())


async def soak(a: argparse.Namespace, base: str, logs: list[TenantLog]) -> float:
    """Run every tenant's clients for `--minutes`; the run's length in seconds."""
    t0 = time.monotonic()
    until = t0 + a.minutes * 60
    tasks = [
        asyncio.create_task(client_loop(a, base, log, random.Random(a.seed * 1000 + i), until, t0))
        for log in logs
        for i in range(a.concurrency)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return time.monotonic() - t0


def tenants_config(a: argparse.Namespace) -> list[TenantLog]:
    return [TenantLog(f"tenant-{i}", f"sk-quota-soak-{i}") for i in range(a.tenants)]


def deploy(a: argparse.Namespace, logs: list[TenantLog]) -> None:
    """The stack: one simulated model, `--ingress-replicas` ingress replicas, the tenants."""
    from ray import serve

    from app.config import load_config
    from benchmarks.simulated_engine import simulated_stack

    quotas = {
        "tokens_per_minute": a.tokens_per_minute,
        "requests_per_second": a.requests_per_second,
        "burst": a.burst,
    }
    config = load_config(
        {
            "models": [{"name": MODEL, "source": f"org/{MODEL}", "replicas": a.engine_replicas}],
            "server": {"ingress_replicas": a.ingress_replicas},
            "tenants": [{"name": t.name, "api_keys": [t.key], "quotas": quotas} for t in logs],
        }
    )
    serve.run(
        simulated_stack(config, delay_s=a.delay_s, tokens=None), name=APP_NAME, route_prefix="/"
    )


def wait_ready(base: str, key: str, *, model: str = MODEL, timeout_s: float = 120) -> None:
    """Until one completion with `key` is answered."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": "hi", "max_tokens": 1}
    while time.monotonic() < deadline:
        try:
            r = httpx.post(
                f"{base}/v1/completions", json=body, timeout=10,
                headers={"authorization": f"Bearer {key}"},
            )  # fmt: skip
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the stack did not answer within {timeout_s:g} s")


def report(a: argparse.Namespace, logs: list[TenantLog], duration_s: float) -> dict[str, Any]:
    tenants = []
    for log in logs:
        events = sorted(log.admitted)
        tokens = sum(n for _, n in events)
        tenants.append(
            {
                "tenant": log.name,
                "admitted": len(events),
                "statuses": {str(k): v for k, v in sorted(log.statuses.items(), key=str)},
                "tokens": tokens,
                "tokens_per_minute": round(tokens / (duration_s / 60), 1),
                "long_run_ratio": round(long_run_ratio(tokens, a.tokens_per_minute, duration_s), 4),
                "token_bucket_excess": round(token_excess(events, a.tokens_per_minute), 4),
                "steady_minute_ratio": _round(
                    steady_minute_ratio(events, a.tokens_per_minute, start_s=60)
                ),
                "request_excess": round(
                    request_excess([t for t, _ in events], a.requests_per_second, a.burst), 2
                ),
            }
        )
    failed = sum(
        n for log in logs for status, n in log.statuses.items() if str(status)[0] in "5c"
    )  # 5xx and connection errors
    held = all(
        t["token_bucket_excess"] <= 0 and t["long_run_ratio"] <= TARGET and t["request_excess"] <= 0
        for t in tenants
    )
    return {
        "settings": settings(a),
        "duration_s": round(duration_s, 1),
        "tenants": tenants,
        "failed": failed,
        "quotas_held": held,
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows = [
        f"| {t['tenant']} | {t['admitted']} | {t['statuses'].get('429', 0)} | "
        f"{t['tokens_per_minute']:.0f} | {t['long_run_ratio']:.4f} | "
        f"{t['token_bucket_excess']:+.4f} | {t['request_excess']:+.2f} | "
        f"{t['steady_minute_ratio']} |"
        for t in r["tenants"]
    ]
    return "\n".join(
        [
            f"{s['tenants']} tenants x {s['concurrency']} clients for {r['duration_s'] / 60:.1f} "
            f"minutes through {s['ingress_replicas']} ingress replicas; each tenant "
            f"{s['tokens_per_minute']} tokens/min and {s['requests_per_second']} requests/s "
            f"(burst {s['burst']}); {s['stream_share']:.0%} streamed.",
            "",
            "| tenant | admitted | 429 | tokens/min (whole run) | beyond the first bucket "
            "/ quota | token bucket excess / quota | request bucket excess | most in a steady "
            "minute / quota |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Failed requests (5xx, connection errors): {r['failed']}. Quotas held: "
            f"{'yes' if r['quotas_held'] else 'NO'}.",
            "",
        ]
    )


def run(a: argparse.Namespace) -> dict[str, Any]:
    logs = tenants_config(a)
    with serve_cluster(None) as port:
        base = f"http://127.0.0.1:{port}"
        deploy(a, logs)
        for log in logs:
            wait_ready(base, log.key)
        time.sleep(a.rest_s)  # the readiness requests' tokens back in the bucket
        duration_s = asyncio.run(soak(a, base, logs))
    return report(a, logs, duration_s)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="How long the load runs.")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=6, help="Clients per tenant.")
    p.add_argument("--ingress-replicas", type=int, default=3)
    p.add_argument("--engine-replicas", type=int, default=2)
    p.add_argument("--tokens-per-minute", type=int, default=1500)
    p.add_argument("--requests-per-second", type=float, default=4.0)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--stream-share", type=float, default=0.5, help="Share of streamed requests.")
    p.add_argument("--max-tokens", type=int, default=48, help="Answers of 4..N tokens.")
    p.add_argument("--delay-s", type=float, default=0.05, help="A simulated answer's time.")
    p.add_argument("--rest-s", type=float, default=65, help="Rest after the readiness checks.")
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main(
        "quota_soak",
        parser(),
        run,
        markdown,
        failed=lambda result: not (result["quotas_held"] and not result["failed"]),
    )
