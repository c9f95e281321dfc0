"""Real peer routers side by side over HTTP, in front of simulated replicas (`app.lab.server`).

`python -m app.lab.peer_bench --workload shared-prefix --replicas 4 --requests 300` starts one
simulator process (a port per simulated replica, loopback only), then, one router at a time and
with the simulated caches reset before each, replays the same trace (open loop, arrival times
multiplied by `--time-scale`, streamed `POST /v1/completions`) through:
- `vllm-router` (PyPI `vllm-router==0.1.17`), policies `cache_aware` and `round_robin`;
- `sglang-router` (PyPI `sglang-router==0.3.2`), policy `cache_aware`;
- ours: `app.routing` policies `scored` and `round_robin` in the tiny HTTP router of
  `app.lab.http_router` (not the Ray Serve stack).
The peers run from a separate virtualenv (`--peer-venv`, default /tmp/peer-venv). Per router it
reports the prefix hit rate from the servers' cached / prompt tokens, TTFT p50/p99 (client side,
first streamed chunk, wall ms), throughput, and in-flight per replica (peak and time-averaged,
max/mean across replicas). Every router gets `--router-timeout` seconds; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.lab.metrics import percentile
from app.lab.trace import TraceRequest
from app.lab.workloads import WORKLOADS

ROUTERS = (
    "vllm-router:cache_aware",
    "vllm-router:round_robin",
    "sglang-router:cache_aware",
    "ours:scored",
    "ours:round_robin",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Outcome:
    ok: bool
    ttft: float = 0.0
    end: float = 0.0
    start: float = 0.0
    prompt: int = 0
    cached: int = -1
    error: str = ""


def router_command(name: str, port: int, workers: list[str], venv: Path, cache_blocks: int):
    """(argv, extra env) for one router."""
    kind, policy = name.split(":")
    if kind == "vllm-router":
        argv = [
            str(venv / "bin" / "vllm-router"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *workers,
            "--policy",
            policy,
            "--log-level",
            "warning",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
        ]
        return argv, {}
    if kind == "sglang-router":
        argv = [
            str(venv / "bin" / "python"),
            "-m",
            "sglang_router.launch_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            *workers,
            "--policy",
            policy,
            "--log-level",
            "warn",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(free_port()),
        ]
        return argv, {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    argv = [
        sys.executable,
        "-m",
        "app.lab.http_router",
        "--port",
        str(port),
        "--policy",
        policy,
        "--cache-blocks",
        str(cache_blocks),
        "--worker-urls",
        *workers,
    ]
    return argv, {}


async def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"exited with status {proc.returncode}"
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return ""
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    return f"not ready within {timeout:.0f} s"


async def _one(client: httpx.AsyncClient, url: str, req: TraceRequest, at: float) -> Outcome:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    body = {
        "model": req.model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
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


async def _replay(url: str, trace: list[TraceRequest], scale: float, timeout: float):
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        t0 = time.monotonic() + 0.5
        tasks = [_one(client, url, r, t0 + (r.t - trace[0].t) * scale) for r in trace]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        except TimeoutError:
            return None


def _stats(workers: list[str], reset: bool = False) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(timeout=10) as client:
        for w in workers:
            if reset:
                client.post(w + "/sim/reset").raise_for_status()
            else:
                out.append(client.get(w + "/sim/stats").json())
    return out


def run_router(name: str, workers: list[str], trace: list[TraceRequest], a) -> dict[str, Any]:
    """Start one router, replay the trace through it, stop it; its figures (or its error)."""
    _stats(workers, reset=True)
    port = free_port()
    argv, env = router_command(name, port, workers, Path(a.peer_venv), a.cache_blocks)
    log = Path(a.log_dir) / f"{name.replace(':', '-')}.log"
    result: dict[str, Any] = {"router": name, "command": " ".join(argv)}
    with open(log, "w") as logf:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )
        except OSError as exc:
            return {**result, "error": f"cannot start: {exc}"}
        try:
            url = f"http://127.0.0.1:{port}"
            problem = asyncio.run(_wait_ready(url, proc, a.start_timeout))
            if problem:
                return {**result, "error": f"{problem}; log tail: {_tail(log)}"}
            _stats(workers, reset=True)
            t0 = time.monotonic()
            outcomes = asyncio.run(_replay(url, trace, a.time_scale, a.router_timeout))
            wall = time.monotonic() - t0
        finally:
            _stop(proc)
    if outcomes is None:
        return {**result, "error": f"replay not finished within {a.router_timeout} s"}
    servers = _stats(workers)
    good = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if not o.ok]
    prompt = sum(s["prompt_tokens"] for s in servers)
    cached = sum(s["cached_tokens"] for s in servers)
    means = [s["mean_in_flight"] for s in servers]
    counts = [s["requests"] for s in servers]
    reported = [o for o in good if o.cached >= 0]
    span = (max(o.end for o in good) - min(o.start for o in good)) if good else 0.0
    ttfts = [o.ttft * 1000 for o in good]
    return {
        **result,
        "requests": len(trace),
        "ok": len(good),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "hit_rate": cached / prompt if prompt else 0.0,
        "client_hit_rate": (sum(o.cached for o in reported) / sum(o.prompt for o in reported))
        if reported and sum(o.prompt for o in reported)
        else None,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "throughput_rps": len(good) / span if span else 0.0,
        "requests_per_replica": counts,
        "peak_in_flight": max(s["max_in_flight"] for s in servers),
        "in_flight_max_over_mean": max(means) / (sum(means) / len(means)) if sum(means) else 1.0,
        "wall_s": wall,
        "calls_per_path": {
            k: sum(s["calls"].get(k, 0) for s in servers)
            for k in sorted({k for s in servers for k in s["calls"]})
        },
    }


def _tail(path: Path, n: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:].replace("\n", " | ")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| router | hit rate | TTFT p50 (ms) | TTFT p99 (ms) | req/s | peak in-flight | "
        "in-flight max/mean | requests per replica | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['router']} | could not run: {r['error']} |||||||")
            continue
        rows.append(
            f"| {r['router']} | {r['hit_rate']:.3f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['throughput_rps']:.2f} | {r['peak_in_flight']} | "
            f"{r['in_flight_max_over_mean']:.2f} | "
            f"{'/'.join(map(str, r['requests_per_replica']))} | {r['errors']} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="shared-prefix", choices=list(WORKLOADS))
    p.add_argument("--param", "-p", action="append", default=[], help="Generator NAME=VALUE.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=300, help="First N requests of the trace.")
    p.add_argument("--routers", nargs="+", default=list(ROUTERS))
    p.add_argument("--time-scale", type=float, default=0.25)
    p.add_argument("--cache-blocks", type=int, default=2048)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--peer-venv", default="/tmp/peer-venv")
    p.add_argument("--start-timeout", type=float, default=60)
    p.add_argument("--router-timeout", type=float, default=180)
    p.add_argument("--log-dir", default="/tmp/peer-bench-logs")
    p.add_argument("--json", dest="json_out", help="Write all results to this file.")
    a = p.parse_args()
    kwargs: dict[str, Any] = {}
    for item in a.param:
        key, _, value = item.partition("=")
        kwargs[key.replace("-", "_")] = float(value) if "." in value else int(value)
    trace = WORKLOADS[a.workload](seed=a.seed, **kwargs)[: a.requests]
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(a.replicas)]
    workers = [f"http://127.0.0.1:{port}" for port in ports]
    sim_argv = [
        sys.executable,
        "-m",
        "app.lab.server",
        "--ports",
        *map(str, ports),
        "--time-scale",
        str(a.time_scale),
        "--cache-blocks",
        str(a.cache_blocks),
        "--max-concurrency",
        str(a.max_concurrency),
    ]
    with open(Path(a.log_dir) / "simulator.log", "w") as logf:
        sim = subprocess.Popen(
            sim_argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    results = []
    try:
        for w in workers:
            problem = asyncio.run(_wait_ready(w, sim, 30))
            if problem:
                raise SystemExit(f"simulator {w}: {problem}")
        for name in a.routers:
            print(f"-- {name}", file=sys.stderr, flush=True)
            res = run_router(name, workers, trace, a)
            print(json.dumps(res), file=sys.stderr, flush=True)
            results.append(res)
    finally:
        _stop(sim)
    summary = {
        "workload": a.workload,
        "params": kwargs,
        "seed": a.seed,
        "replicas": a.replicas,
        "requests": len(trace),
        "time_scale": a.time_scale,
        "cache_blocks": a.cache_blocks,
        "results": results,
    }
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(summary, indent=1))
    print(
        f"{a.workload}, {a.replicas} simulated replicas, {len(trace)} requests, "
        f"time scale {a.time_scale}"
    )
    print(table(results))


if __name__ == "__main__":
    main()
