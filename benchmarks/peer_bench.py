"""Real peer routers side by side over HTTP, in front of simulated replicas (`sim_server`).

`python -m benchmarks.peer_bench --workload shared-prefix --replicas 4 --requests 300` starts one
simulator process (a port per simulated replica, loopback only), then, one router at a time and
with the simulated caches reset before each, replays the same trace (open loop, arrival times
multiplied by `--time-scale`, streamed `POST /v1/completions`) through:
- `vllm-router` (PyPI `vllm-router==0.1.17`), policies `cache_aware` and `round_robin`;
- `sglang-router` (PyPI `sglang-router==0.3.2`), policy `cache_aware`;
- `ray:prefix_cache_affinity`: stock Ray Serve LLM (`OpenAiIngress`) with Ray's
  `PrefixCacheAffinityRouter` (default settings) in front of forwarding simulated engines
  (`benchmarks.ray_fronts`: one Serve replica per simulated replica, forwarding over HTTP);
- `ours-stack:POLICY`: our stack (Ray Serve proxy, our `Ingress`, our request router with that
  `app.routing` policy) in front of the same kind of forwarding simulated engines;
- `ours:POLICY`: the same policy code in the tiny HTTP router of `benchmarks.http_router` (a
  stand-in without Ray Serve: the policy without the stack's overhead).
The peers run from a separate virtualenv (`--peer-venv`, default /tmp/peer-venv); the Ray fronts
run in a Ray cluster started in this process (`ray.init(address="local")`, Serve on a free
loopback port). Every router gets `--warmup` sequential requests with short unrelated prompts
before the simulated caches are reset (Ray Serve creates its request router on the first
request). Per router it reports the prefix hit rate from the servers' cached / prompt tokens,
modelled TTFT p50/p99 (arrival at a simulated replica to first token: queueing and prefill,
which the routing decides, without the router's own path; computed by the lab's model from the
requests each replica got, at the trace's arrival times, which are posted to the simulators
before the replay: deterministic given the routing),
client TTFT p50/p99 (first streamed chunk, wall ms), throughput, and in-flight per replica
(peak and time-averaged, max/mean across replicas), then checks `--target` (default
`ours-stack:scored`) against the pooled-cache oracle and the peers. Several `--workload`s and
`--replicas` counts run in one go: one simulator process per replica count (reset between
routers), one Ray cluster for the whole run; Ray's front is deployed once per replica count and
its prefix tree emptied before each trace. Every router gets `--router-timeout` seconds for its
replay; the run stops by itself.

`--trace FILE` replays a trace file instead of the generators (`app.lab.trace`: text prompts,
chat messages (rendered, sent as completions), token ids, or the block hashes `vrstack capture`
records), its first `--requests` requests, every model replaced by the simulated one: token-id
prompts are sent as such, and a blocks line as the token ids its hashes stand for
(`app.lab.trace.block_token_ids`: a block hash gives the same ids wherever it comes, so every
router sees the prefixes the trace shares); each request asks for the output tokens its answer
had (`output_tokens`) when the trace knows them, else its `max_tokens`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from app.lab.figures import percentile
from app.lab.oracle import pooled_oracle
from app.lab.trace import TraceRequest, read_trace
from app.lab.workloads import WORKLOADS
from app.routing import prompt_text
from benchmarks.processes import (
    ROOT,
    FrontError,
    free_port,
    free_ports,
    router_subprocess,
    stop,
    wait_ready,
)
from benchmarks.ray_fronts import FRONT_KINDS, RayFronts
from benchmarks.sim_server import arrival_key

ROUTERS = (
    "vllm-router:cache_aware",
    "vllm-router:round_robin",
    "sglang-router:cache_aware",
    "ray:prefix_cache_affinity",
    "ours-stack:scored",
    "ours:scored",
)
PEER_KINDS = ("vllm-router", "sglang-router", "ray")
TARGETS = ("ours-stack:scored", "ours:scored")
SIM_MODEL = "default"  # the model the simulated replicas and the Ray fronts serve


@dataclass
class Outcome:
    ok: bool
    ttft: float = 0.0
    end: float = 0.0
    start: float = 0.0
    prompt: int = 0
    cached: int = -1
    error: str = ""


async def _one(client: httpx.AsyncClient, url: str, req: TraceRequest, at: float) -> Outcome:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    body = {
        "model": req.model,
        "prompt": req.replay_prompt(),
        "max_tokens": req.decode_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    out = Outcome(False, start=time.monotonic())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                out.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return out
            async for line in reply.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                if not out.ttft:
                    out.ttft = time.monotonic() - out.start
                chunk = json.loads(line[5:])
                usage = chunk.get("usage")
                if usage:
                    out.prompt = usage.get("prompt_tokens", 0)
                    out.cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", -1)
        out.ok, out.end = out.ttft > 0, time.monotonic()
    except (httpx.HTTPError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def replay(
    url: str, trace: list[TraceRequest], scale: float, timeout: float
) -> list[Outcome] | None:
    """The trace sent open-loop (arrival times x `scale`); None if not done within `timeout`."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.monotonic() + 0.5
        tasks = [_one(client, url, r, t0 + (r.t - trace[0].t) * scale) for r in trace]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        except TimeoutError:
            return None


async def warm_up(url: str, count: int, model: str, timeout: float) -> str:
    """`count` sequential requests with short prompts unrelated to any trace; the first error."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        for i in range(count):
            text = f"{uuid.uuid4().hex} warm-up request {i} of the peer bench"
            req = TraceRequest(0.0, model, prompt=text, max_tokens=1)
            out = await _one(client, url, req, 0.0)
            if not out.ok:
                return out.error
    return ""


def sim_stats(
    workers: list[str], reset: bool = False, trace: list[TraceRequest] | None = None
) -> list[dict[str, Any]]:
    """Each simulated replica's `/sim/stats`; or reset them all and post `trace`'s modelled
    arrival times (seconds from its first request) as their schedule, returning []."""
    out = []
    arrivals = [[arrival_key(sim_text(r)), r.t - trace[0].t] for r in trace or ()]
    with httpx.Client(timeout=30) as client:
        for w in workers:
            if reset:
                client.post(w + "/sim/reset").raise_for_status()
                if arrivals:
                    client.post(w + "/sim/schedule", json={"arrivals": arrivals}).raise_for_status()
            else:
                out.append(client.get(w + "/sim/stats").json())
    return out


def sim_text(request: TraceRequest) -> str:
    """The request's prompt as the simulated replicas read it (token ids as decimal words)."""
    return prompt_text({"prompt": request.replay_prompt()})


def load_trace(name: str, a, params: dict[str, Any]) -> list[TraceRequest]:
    """The first `a.requests` requests of trace file `a.trace` (every model replaced by
    `SIM_MODEL`), else of the generated workload `name`."""
    if a.trace:
        trace = [replace(r, model=SIM_MODEL) for r in read_trace(a.trace)]
    else:
        trace = WORKLOADS[name](seed=a.seed, **params)
    return trace[: a.requests]


@contextmanager
def router_process(
    name: str, workers: list[str], venv: Path, cache_blocks: int, log: Path, start_timeout: float
) -> Iterator[tuple[str, str]]:
    """`router_subprocess` as the Ray fronts are: (URL, command line)."""
    with router_subprocess(name, workers, venv, cache_blocks, log, start_timeout) as started:
        yield started[:2]


@contextmanager
def ray_front(
    name: str, workers: list[str], cache_blocks: int, fronts: RayFronts
) -> Iterator[tuple[str, str]]:
    """A Ray Serve front (`benchmarks.ray_fronts`) deployed over `workers`: (URL, description);
    deleted on exit. FrontError if the deploy fails."""
    kind, policy = name.split(":")
    try:  # Ray's front is kept for the next trace over the same simulators (tree emptied)
        url = fronts.deploy(kind, policy, workers, cache_blocks, keep=kind == "ray")
    except Exception as exc:  # a failed deploy is reported in the results, not fatal
        with contextlib.suppress(Exception):
            fronts.delete()
        raise FrontError(f"deploy failed: {type(exc).__name__}: {exc}") from None
    try:
        yield url, f"in-process Ray Serve application ({name}), see benchmarks.ray_fronts"
    finally:
        fronts.delete()


def run_router(
    name: str, workers: list[str], trace: list[TraceRequest], a, fronts: RayFronts | None = None
) -> dict[str, Any]:
    """Start one router, warm it up, replay the trace through it, stop it; its figures (or
    its error)."""
    sim_stats(workers, reset=True)
    if name.split(":")[0] in FRONT_KINDS:
        if fronts is None:
            return {"router": name, "error": "no Ray cluster"}
        front = ray_front(name, workers, a.cache_blocks, fronts)
    else:
        log = Path(a.log_dir) / f"{name.replace(':', '-')}.log"
        front = router_process(
            name, workers, Path(a.peer_venv), a.cache_blocks, log, a.start_timeout
        )
    try:
        with front as (url, command):
            result: dict[str, Any] = {"router": name, "command": command}
            problem = asyncio.run(warm_up(url, a.warmup, trace[0].model, a.start_timeout))
            if problem:
                return {**result, "error": f"warm-up failed: {problem}"}
            sim_stats(workers, reset=True, trace=trace)
            t0 = time.monotonic()
            outcomes = asyncio.run(replay(url, trace, a.time_scale, a.router_timeout))
            wall = time.monotonic() - t0
    except FrontError as exc:
        return {"router": name, "error": str(exc)}
    if outcomes is None:
        return {**result, "error": f"replay not finished within {a.router_timeout} s"}
    return {**result, **figures(outcomes, sim_stats(workers)), "wall_s": wall}


def figures(outcomes: list[Outcome], servers: list[dict[str, Any]]) -> dict[str, Any]:
    """Hit rate, TTFT, throughput and per-replica load of one replay."""
    good = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if not o.ok]
    prompt = sum(s["prompt_tokens"] for s in servers)
    cached = sum(s["cached_tokens"] for s in servers)
    means = [s["mean_in_flight"] for s in servers]
    reported = [o for o in good if o.cached >= 0]
    reported_prompt = sum(o.prompt for o in reported)
    span = (max(o.end for o in good) - min(o.start for o in good)) if good else 0.0
    ttfts = [o.ttft * 1000 for o in good]
    modelled = [t * 1000 for s in servers for t in s.get("model_ttft_s", ())]
    slept = [t * 1000 for s in servers for t in s.get("ttft_s", ())]
    return {
        "requests": len(outcomes),
        "ok": len(good),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "hit_rate": cached / prompt if prompt else 0.0,
        "client_hit_rate": sum(o.cached for o in reported) / reported_prompt
        if reported_prompt
        else None,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "modelled_ttft_p50_ms": percentile(modelled, 50) if modelled else None,
        "modelled_ttft_p99_ms": percentile(modelled, 99) if modelled else None,
        "slept_ttft_p99_ms": percentile(slept, 99) if slept else None,
        "unscheduled": sum(s["requests"] - s.get("scheduled", 0) for s in servers),
        "throughput_rps": len(good) / span if span else 0.0,
        "requests_per_replica": [s["requests"] for s in servers],
        "peak_in_flight": max(s["max_in_flight"] for s in servers),
        "in_flight_max_over_mean": max(means) / (sum(means) / len(means)) if sum(means) else 1.0,
        "calls_per_path": {
            k: sum(s["calls"].get(k, 0) for s in servers)
            for k in sorted({k for s in servers for k in s["calls"]})
        },
    }


def check_targets(
    results: list[dict[str, Any]], target: str, oracle: float
) -> dict[str, Any] | None:
    """Issue #3's targets for `target` against the oracle and every peer that ran."""
    ours = next((r for r in results if r["router"] == target and "error" not in r), None)
    peers = [r for r in results if r["router"].split(":")[0] in PEER_KINDS and "error" not in r]
    if ours is None or not peers:
        return None
    hit_gap = ours["hit_rate"] - max(p["hit_rate"] for p in peers)
    p99_gap = ours["ttft_p99_ms"] - min(p["ttft_p99_ms"] for p in peers)
    modelled = [m for p in peers if (m := p.get("modelled_ttft_p99_ms")) is not None]
    ours_modelled = ours.get("modelled_ttft_p99_ms")
    modelled_gap = ours_modelled - min(modelled) if modelled and ours_modelled is not None else None
    ratio = ours["hit_rate"] / oracle if oracle else 1.0
    imbalance = ours["in_flight_max_over_mean"]
    return {
        "router": target,
        "hit_vs_oracle": ratio,
        "hit_minus_best_peer": hit_gap,
        "in_flight_max_over_mean": imbalance,
        "ttft_p99_minus_best_peer_ms": p99_gap,
        "modelled_ttft_p99_minus_best_peer_ms": modelled_gap,
        "met": {
            "hit_vs_oracle": ratio >= 0.95,
            "hit_vs_peers": hit_gap >= 0,
            "load": imbalance <= 1.25,
            "modelled_ttft_p99": modelled_gap is not None and modelled_gap <= 0,
        },
    }


def targets_line(t: dict[str, Any]) -> str:
    return (
        f"{t['router']} vs targets: hit/oracle {t['hit_vs_oracle']:.3f} (>= 0.95), "
        f"hit - best peer {t['hit_minus_best_peer']:+.3f} (>= 0), "
        f"in-flight max/mean {t['in_flight_max_over_mean']:.2f} (<= 1.25), "
        f"modelled TTFT p99 - best peer's {_signed(t['modelled_ttft_p99_minus_best_peer_ms'])} "
        f"ms (<= 0); client TTFT p99 - best peer's {t['ttft_p99_minus_best_peer_ms']:+.0f} ms wall"
    )


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def table(results: list[dict[str, Any]], oracle: float) -> str:
    """Markdown table of the routers' figures (hit / oracle: hit rate over the pooled oracle)."""
    rows = [
        "| router | hit rate | hit / oracle | modelled TTFT p50 / p99 (ms) | client TTFT p50 / "
        "p99 (wall ms) | req/s | peak in-flight | in-flight max/mean | requests per replica "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['router']} | could not run: {r['error']} ||||||||")
            continue
        ratio = r["hit_rate"] / oracle if oracle else 1.0
        modelled = "-"
        if r.get("modelled_ttft_p50_ms") is not None:
            modelled = f"{r['modelled_ttft_p50_ms']:.0f} / {r['modelled_ttft_p99_ms']:.0f}"
        rows.append(
            f"| {r['router']} | {r['hit_rate']:.3f} | {ratio:.3f} | {modelled} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['throughput_rps']:.2f} | "
            f"{r['peak_in_flight']} | "
            f"{r['in_flight_max_over_mean']:.2f} | "
            f"{'/'.join(map(str, r['requests_per_replica']))} | {r['errors']} |"
        )
    return "\n".join(rows)


def start_simulator(
    ports: list[int], log_dir: Path, time_scale: float, cache_blocks: int, max_concurrency: int
) -> subprocess.Popen:
    """The HTTP simulator (`sim_server`), a loopback port per simulated replica; ready."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.sim_server",
        "--ports",
        *map(str, ports),
        "--time-scale",
        str(time_scale),
        "--cache-blocks",
        str(cache_blocks),
        "--max-concurrency",
        str(max_concurrency),
    ]
    with open(log_dir / "simulator.log", "w") as logf:
        sim = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
    for port in ports:
        problem = asyncio.run(wait_ready(f"http://127.0.0.1:{port}", sim, 30))
        if problem:
            stop(sim)
            raise SystemExit(f"simulator on port {port}: {problem}")
    return sim


def run_config(
    workload: str, workers: list[str], a, fronts: RayFronts | None, params: dict[str, Any]
) -> dict[str, Any]:
    """Every router of `a.routers` in turn over one trace and the simulated replicas."""
    trace = load_trace(workload, a, params)
    oracle = pooled_oracle([r.view() for r in trace], len(workers) * a.cache_blocks, 16)
    results = []
    for name in a.routers:
        print(f"-- {workload}, {len(workers)} replicas: {name}", file=sys.stderr, flush=True)
        res = run_router(name, workers, trace, a, fronts)
        print(json.dumps(res), file=sys.stderr, flush=True)
        results.append(res)
    checks = [t for name in a.target if (t := check_targets(results, name, oracle))]
    return {
        "workload": workload,
        "params": params,
        "seed": a.seed,
        "replicas": len(workers),
        "requests": len(trace),
        "time_scale": a.time_scale,
        "cache_blocks": a.cache_blocks,
        "oracle_hit_rate": oracle,
        "results": results,
        "targets": checks,
    }


def report(summary: dict[str, Any]) -> str:
    """A markdown heading, the routers' table and the target checks of one configuration."""
    lines = [
        f"#### {summary['workload']}, {summary['replicas']} simulated replicas, "
        f"{summary['requests']} requests (seed {summary['seed']}, time scale "
        f"{summary['time_scale']:g}, oracle hit rate {summary['oracle_hit_rate']:.3f})",
        "",
        table(summary["results"], summary["oracle_hit_rate"]),
        "",
    ]
    lines += [targets_line(t) + "  " for t in summary["targets"]]
    return "\n".join(lines).rstrip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", nargs="+", default=["shared-prefix"], choices=list(WORKLOADS))
    p.add_argument("--param", "-p", action="append", default=[], help="Generator NAME=VALUE.")
    p.add_argument("--trace", help="Replay this trace file (JSONL) instead of --workload.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, nargs="+", default=[4])
    p.add_argument("--requests", type=int, default=300, help="First N requests of the trace.")
    p.add_argument("--routers", nargs="+", default=list(ROUTERS))
    p.add_argument("--target", nargs="+", default=list(TARGETS), help="Routers to check.")
    p.add_argument("--time-scale", type=float, default=0.25)
    p.add_argument("--cache-blocks", type=int, default=2048)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8, help="Warm-up requests per router.")
    p.add_argument("--peer-venv", default="/tmp/peer-venv")
    p.add_argument("--start-timeout", type=float, default=60)
    p.add_argument("--router-timeout", type=float, default=180)
    p.add_argument("--log-dir", default="/tmp/peer-bench-logs")
    p.add_argument(
        "--json",
        dest="json_out",
        help="Write each configuration's results here ({workload} and {replicas} are filled in).",
    )
    a = p.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    params: dict[str, Any] = {}
    for item in a.param:
        key, _, value = item.partition("=")
        params[key.replace("-", "_")] = float(value) if "." in value else int(value)
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    fronts: RayFronts | None = None
    try:
        if any(name.split(":")[0] in FRONT_KINDS for name in a.routers):
            fronts = RayFronts.start(free_port())
        for replicas in a.replicas:
            ports = free_ports(replicas)
            workers = [f"http://127.0.0.1:{port}" for port in ports]
            sim = start_simulator(ports, log_dir, a.time_scale, a.cache_blocks, a.max_concurrency)
            try:
                for workload in [Path(a.trace).stem] if a.trace else a.workload:
                    summary = run_config(workload, workers, a, fronts, params)
                    if a.json_out:
                        path = a.json_out.format(workload=workload, replicas=replicas)
                        Path(path).write_text(json.dumps(summary, indent=1))
                    print(report(summary) + "\n", flush=True)
            finally:
                if fronts is not None:
                    fronts.clear()
                stop(sim)
    finally:
        if fronts is not None:
            fronts.close()


if __name__ == "__main__":
    main()
