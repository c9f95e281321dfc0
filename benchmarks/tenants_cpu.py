"""The noisy neighbour on real CPU engines: other tenants' TTFT with and without a tenant at 10x.

    flock /tmp/vrstack-bench.lock python -m benchmarks.tenants_cpu --json out.json

The embedded model (`serve_configs/smollm2-cpu.yaml`'s settings) on `--replicas` real vLLM CPU
engines of `--max-num-seqs` sequences each, in the stack's high-throughput mode on an in-process
Ray cluster (`benchmarks.overhead.serve_cluster`; loopback only). Tenants `interactive` (class
interactive), `team-a` and `team-b` (class standard) send streamed chat completions (Poisson,
`--rate` requests/s each); `noisy` (class standard) sends at `--noisy-multiple` times that. Each
rule runs twice on the same engines: the others alone, then with `noisy`:

- `fair`: the keys are tenants: fair admission in the ingress (with its defaults: a tenant
  with a deep backlog demoted a class, preemption of less important streams), priority in the
  engines;
- `fair-queue`: the same, with `admission: {demote_backlog: null, preempt: false}` (the queue's
  order alone);
- `fcfs`: the same keys as plain `auth` keys (no tenants): no queue in front of the engines,
  which schedule first come first served.

Every request goes through the `openai` client; TTFT is the time to the first streamed chunk. Both
phases send the others' requests at the same times with the same prompts (one seed), after a 20 s
warm-up with every tenant. The report: each tenant's TTFT p50/p90/p99 per phase, and the others'
together (`others`: about 50 requests a phase at the defaults, where a tenant's p99 is its slowest
of about 16; `--duration-s 300` gives about 50 a tenant), the others' worst p99 ratio and their
ratio together (with `noisy` / alone; the target is <= 1.5), requests refused per tenant, `noisy`'s
answered requests/s, streams preempted per phase, the CPU each part of the stack used per phase
(cores: the ingress replica, the engine replicas, their vLLM engine cores, HAProxy, the raylet, the
GCS, this process (the clients and the Ray driver), every other process by its title (vLLM's
workers among them) and the machine; and the ingress's CPU ms per request sent), and every request
(tenant, when it was sent, TTFT or failure) in the JSON.
The run stops its Ray cluster and everything it started by itself, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.bench.load import words
from app.bench.summary import percentile
from benchmarks.command import main, report_options, settings
from benchmarks.overhead import SHARED, CpuMeter, cpu_delta, serve_cluster

CONFIG = Path("serve_configs/smollm2-cpu.yaml")
APP_NAME = "tenants-cpu"
LIGHT = {"interactive": "interactive", "team-a": "standard", "team-b": "standard"}
NOISY = "noisy"
OTHERS = "others"  # the light tenants' requests together
RULES = ("fair", "fair-queue", "fcfs")
OTHER = "other: "
CPU_GROUPS = ("ingress", "engine replicas", "engine cores", "haproxy", "ray", "gcs", "client")


@dataclass(slots=True)
class Phase:
    """One phase's requests per tenant: TTFTs of answered ones, failures by status, and each
    request as (tenant, seconds into the phase it was sent, TTFT or failure)."""

    ttfts: dict[str, list[float]] = field(default_factory=dict)
    refused: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: list[tuple[str, float, float | str]] = field(default_factory=list)
    duration_s: float = 0.0

    def figures(self) -> dict[str, dict[str, Any]]:
        out = {tenant: _figures(values) for tenant, values in sorted(self.ttfts.items())}
        for tenant, figures in out.items():
            figures["refused"] = self.refused.get(tenant, {})
        out[OTHERS] = _figures([x for t in LIGHT for x in self.ttfts.get(t, [])])
        return out


def _figures(values: list[float]) -> dict[str, Any]:
    return {
        "answered": len(values),
        "ttft_p50": _r(percentile(values, 50)),
        "ttft_p90": _r(percentile(values, 90)),
        "ttft_p99": _r(percentile(values, 99)),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def keys() -> dict[str, str]:
    return {name: f"sk-noisy-lab-{name}" for name in (*LIGHT, NOISY)}


def stack_args(rule: str, a: argparse.Namespace) -> dict[str, Any]:
    """The serve config's args with `--replicas` engines of `--max-num-seqs`, and the keys as
    tenants (`fair`, `fair-queue`) or as plain keys (`fcfs`)."""
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    args = app["args"]
    model = args["models"][0]
    model["replicas"] = a.replicas
    model.setdefault("engine_args", {})["max_num_seqs"] = a.max_num_seqs
    names = keys()
    if rule == "fcfs":
        args["auth"] = {"api_keys": list(names.values()), "api_keys_env": None}
        return args
    args["auth"] = {"api_keys_env": None}
    if rule == "fair-queue":
        args["admission"] = {"demote_backlog": None, "preempt": False}
    classes = {**LIGHT, NOISY: "standard"}
    args["tenants"] = [
        {"name": name, "api_keys": [key], "priority": classes[name]} for name, key in names.items()
    ]
    return args


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, a: argparse.Namespace):
    """The TTFT of one streamed chat, or the failure's status as text."""
    started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=a.max_tokens,
            temperature=0,
            stream=True,
        )
        ttft = None
        async for _ in stream:
            if ttft is None:
                ttft = time.perf_counter() - started
        return ttft if ttft is not None else "empty"
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    except openai.APIError as exc:
        return type(exc).__name__


async def phase(base: str, model: str, tenants: list[str], a: argparse.Namespace, seed: int):
    """Poisson arrivals per tenant for `--duration-s`; every request awaited at the end."""
    result = Phase()
    names = keys()
    clients = {
        t: openai.AsyncOpenAI(base_url=base + "/v1", api_key=names[t], max_retries=0, timeout=300)
        for t in tenants
    }

    async def tenant_load(tenant: str, rng: random.Random) -> None:
        rate = a.rate * (a.noisy_multiple if tenant == NOISY else 1)
        tasks, sent, t = [], [], rng.expovariate(rate)
        start = time.monotonic()
        while t < a.duration_s:
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            prompt = words(rng, a.prompt_words)
            tasks.append(asyncio.create_task(one(clients[tenant], model, prompt, a)))
            sent.append(round(t, 3))
            t += rng.expovariate(rate)
        for at, outcome in zip(sent, await asyncio.gather(*tasks), strict=True):
            result.requests.append(
                (tenant, at, _r(outcome) if isinstance(outcome, float) else outcome)
            )
            if isinstance(outcome, float):
                result.ttfts.setdefault(tenant, []).append(outcome)
            else:
                refused = result.refused.setdefault(tenant, {})
                refused[outcome] = refused.get(outcome, 0) + 1

    started = time.monotonic()
    try:
        await asyncio.gather(
            *(tenant_load(t, random.Random(seed * 100 + i)) for i, t in enumerate(tenants))
        )
    finally:
        for client in clients.values():
            await client.close()
    result.duration_s = time.monotonic() - started
    return result


def run_rule(rule: str, base: str, a: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from app.builder import build_app
    from benchmarks.quota_soak import wait_ready

    args = stack_args(rule, a)
    model = args["models"][0]["name"]
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    names = keys()
    wait_ready(base, names[NOISY], model=model, timeout_s=600)
    # warm-up, not measured: every tenant, so the engines have run full batches once
    asyncio.run(phase(base, model, [*LIGHT, NOISY], _warm(a), a.seed + 1))
    meter = cpu_meter()
    before, cpu0 = preemptions(base), meter.read()
    alone = asyncio.run(phase(base, model, list(LIGHT), a, a.seed))
    between, cpu1 = preemptions(base), meter.read()
    noisy = asyncio.run(phase(base, model, [*LIGHT, NOISY], a, a.seed))
    after, cpu2 = preemptions(base), meter.read()
    serve.delete(APP_NAME)
    with_noisy, by_itself = noisy.figures(), alone.figures()
    ratios = {
        t: (with_noisy[t]["ttft_p99"] or 0) / by_itself[t]["ttft_p99"]
        for t in (*LIGHT, OTHERS)
        if t in with_noisy and t in by_itself and by_itself[t]["ttft_p99"]
    }
    worst = max((t for t in ratios if t != OTHERS), key=ratios.__getitem__, default=None)
    return {
        "rule": rule,
        "alone": by_itself,
        "with_noisy": with_noisy,
        "worst_tenant": worst,
        "worst_p99_ratio": _r(ratios[worst]) if worst else None,
        "others_p99_ratio": _r(ratios.get(OTHERS)),
        "noisy_rps": round(with_noisy.get(NOISY, {}).get("answered", 0) / noisy.duration_s, 3),
        "preempted": _less(after, between),
        "preempted_alone": _less(between, before),
        "cpu": {"alone": cpu_use(cpu0, cpu1, alone), "with_noisy": cpu_use(cpu1, cpu2, noisy)},
        "requests": {"alone": alone.requests, "with_noisy": noisy.requests},
    }


def cpu_meter() -> CpuMeter:
    """The stack's parts as process groups (`benchmarks.overhead.CpuMeter`)."""
    from app.engines.llm_config import DEPLOYMENT_PREFIX

    meter = CpuMeter(rest=True)
    meter.add("client", [os.getpid()])  # the clients and the Ray driver
    meter.find(
        {
            "ingress": f"ServeReplica:{APP_NAME}:ingress",
            "engine replicas": f"ServeReplica:{APP_NAME}:{DEPLOYMENT_PREFIX}",
            "engine cores": "EngineCore",
            "haproxy": SHARED["haproxy"],
            "ray": "raylet",
            "gcs": "gcs_server",
        }
    )
    return meter


def cpu_use(before: dict[str, Any], after: dict[str, Any], phase: Phase) -> dict[str, Any]:
    """Cores each group used over a phase, the machine's, and the ingress's CPU ms per request
    sent."""
    seconds = cpu_delta(before, after)
    wall = max(1e-9, after["at"] - before["at"])
    cores = {
        name: round(cpu / wall, 3)
        for name, cpu in sorted(seconds.items(), key=lambda item: -item[1])
        if not name.startswith(OTHER) or cpu / wall >= 0.005  # not every idle process
    }
    sent = len(phase.requests)
    per_request = seconds["ingress"] * 1000 / sent if sent else None
    return {"cores": cores, "ingress_ms_per_request": _r(per_request), "sent": sent}


def _less(counts: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    return {k: v - earlier.get(k, 0) for k, v in counts.items() if v > earlier.get(k, 0)}


def preemptions(base: str) -> dict[str, int]:
    """Streams stopped for a more important waiter so far, per tenant, from the ingress's
    `/metrics` (one ingress replica)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {
        sample.labels["tenant"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vrstack_tenant_preemptions_total" and sample.value
    }


def _warm(a: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(a), "duration_s": min(20.0, a.duration_s)})


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['replicas']} real CPU engines of {s['max_num_seqs']} sequences; tenants "
        f"{', '.join(LIGHT)} at {s['rate']} requests/s each, `noisy` at {s['noisy_multiple']}x; "
        f"streamed chats of {s['prompt_words']} words, {s['max_tokens']} tokens out; "
        f"{s['duration_s']:g} s a phase.",
        "",
        "| rule | tenant | TTFT p99 alone | TTFT p99 with noisy | ratio | refused with noisy |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in report["rules"]:
        for tenant in (*LIGHT, OTHERS, NOISY):
            alone = r["alone"].get(tenant, {})
            noisy = r["with_noisy"].get(tenant, {})
            p_alone, p_noisy = alone.get("ttft_p99"), noisy.get("ttft_p99")
            ratio = f"{p_noisy / p_alone:.2f}x" if p_alone and p_noisy else "-"
            refused = ", ".join(f"{k}: {v}" for k, v in noisy.get("refused", {}).items()) or "-"
            lines.append(
                f"| {r['rule']} | {tenant} | {_s(p_alone)} | {_s(p_noisy)} | {ratio} | {refused} |"
            )
    lines += [
        "",
        *(
            f"`{r['rule']}`: others' worst TTFT p99 ratio {r['worst_p99_ratio']}x "
            f"({r['worst_tenant']}), together {r['others_p99_ratio']}x; `noisy` answered "
            f"{r['noisy_rps']} requests/s; streams preempted with noisy: "
            f"{r['preempted'] or 'none'}, alone: {r['preempted_alone'] or 'none'}."
            for r in report["rules"]
        ),
        "",
        "| rule | phase | " + " | ".join(CPU_GROUPS) + " | other | machine | ingress ms/request |",
        "|---|---|" + "---:|" * (len(CPU_GROUPS) + 3),
    ]
    others = []
    for r in report["rules"]:
        for name, use in r.get("cpu", {}).items():
            rest = {g: c for g, c in use["cores"].items() if g.startswith(OTHER)}
            cores = [use["cores"].get(g, 0) for g in CPU_GROUPS]
            cores += [sum(rest.values()), use["cores"]["machine"]]
            per_request = use["ingress_ms_per_request"]
            lines.append(
                f"| {r['rule']} | {name} | {' | '.join(f'{c:.2f}' for c in cores)} | "
                f"{'-' if per_request is None else f'{per_request:.1f}'} |"
            )
            top = ", ".join(f"{g[len(OTHER) :]} {c:.2f}" for g, c in list(rest.items())[:4])
            others.append(f"`{r['rule']}`, {name}: other processes: {top or 'none'}.")
    lines += ["", "(CPU in cores used over the phase; the machine has 2.)", "", *others, ""]
    return "\n".join(lines)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def run(a: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    results = []
    with serve_cluster(None) as port:
        base = f"http://127.0.0.1:{port}"
        for rule in a.rules:
            results.append(run_rule(rule, base, a))
    return {"settings": settings(a), "rules": results}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--replicas", type=int, default=2, help="Real CPU engines.")
    p.add_argument("--max-num-seqs", type=int, default=4, help="Sequences per engine.")
    p.add_argument(
        "--rate",
        type=float,
        default=0.18,
        help="Requests/s of each other tenant: together under half of what the engines answer "
        "(2 SmolLM2 CPU engines answer about 1.3 requests/s on a 2-core AVX2 machine); on a "
        "slower machine the others' own bursts queue and fill both phases' tails.",
    )
    p.add_argument("--noisy-multiple", type=float, default=10.0)
    p.add_argument("--duration-s", type=float, default=120.0, help="Length of each phase.")
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main("tenants_cpu", parser(), run, markdown)
