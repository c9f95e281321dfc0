"""Batches beside interactive traffic on real CPU engines: interactive TTFT with and without a
full batch backlog.

    flock /tmp/vrstack-e2e.lock python -m benchmarks.batch_interference \
        --json benchmarks/results/batch-interference.json

The embedded model (`serve_configs/smollm2-cpu.yaml`'s settings) on `--replicas` real vLLM CPU
engines of `--max-num-seqs` sequences, scheduling by priority, in the stack's high-throughput
mode on an in-process Ray cluster (`benchmarks.overhead.serve_cluster`; loopback only).
Interactive clients send streamed chats (Poisson, `--rate` requests/s, the `openai` client;
TTFT is the time to the first chunk) for `--duration-s`, in two phases on the same engines,
alternated for `--rounds` rounds (the machine's noise falls on both alike):

- `alone`: nothing else runs;
- `backlog`: a batch of `--batch-requests` chats of `--batch-max-tokens` tokens (far more than
  the phase can finish) created through the `openai` client's batch API just before, running at
  `batches.max_concurrent` (`--batch-concurrency`) per model, cancelled after the phase.

The report: interactive TTFT p50/p90/p99 per phase over every round's requests (and per round),
the p99 ratio (backlog / alone; the target is <= 1.2), and the batch requests completed during
the backlog phases (per second). The run
stops its Ray cluster and everything it started by itself, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import openai
import yaml

from app.bench.load import words
from app.bench.summary import percentile
from benchmarks.command import main, report_options, settings
from benchmarks.overhead import serve_cluster
from benchmarks.tenants_cpu import one

CONFIG = Path("serve_configs/smollm2-cpu.yaml")
APP_NAME = "batch-interference"


def stack_args(a: argparse.Namespace) -> dict[str, Any]:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    args = copy.deepcopy(app["args"])
    model = args["models"][0]
    model["replicas"] = a.replicas
    model["engine_args"] = {**model.get("engine_args", {}), "max_num_seqs": a.max_num_seqs,
                            "scheduling_policy": "priority"}  # fmt: skip
    args["batches"] = {"max_concurrent": a.batch_concurrency}
    return args


async def interactive(base: str, model: str, a: argparse.Namespace, seed: int) -> list[float]:
    """Poisson streamed chats for `--duration-s`: the TTFT of each answered one."""
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    tasks, t, start = [], rng.expovariate(a.rate), time.monotonic()
    try:
        while t < a.duration_s:
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            prompt = words(rng, a.prompt_words)
            tasks.append(asyncio.create_task(one(client, model, prompt, a)))
            t += rng.expovariate(a.rate)
        outcomes = await asyncio.gather(*tasks)
    finally:
        await client.close()
    failed = [o for o in outcomes if not isinstance(o, float)]
    if failed:
        logging.warning("interactive requests failed: %s", failed)
    return [o for o in outcomes if isinstance(o, float)]


def backlog(base: str, model: str, a: argparse.Namespace) -> tuple[openai.OpenAI, str]:
    """A batch far longer than the phase, created and running: (client, batch id)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    rng = random.Random(7)
    lines = [
        {"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "max_tokens": a.batch_max_tokens, "temperature": 0,
                  "messages": [{"role": "user", "content": words(rng, a.prompt_words)}]}}
        for i in range(a.batch_requests)
    ]  # fmt: skip
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("backlog.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1:  # it runs
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not start within 120 s")
        time.sleep(0.5)
    return client, batch.id


def figures(ttfts: list[float]) -> dict[str, Any]:
    xs = sorted(ttfts)
    return {"answered": len(xs), **{f"ttft_p{q}": _r(percentile(xs, q)) for q in (50, 90, 99)}}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def run(a: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from app.builder import build_app
    from benchmarks.quota_soak import wait_ready

    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = stack_args(a)
    model = args["models"][0]["name"]
    with serve_cluster(None) as port:
        base = f"http://127.0.0.1:{port}"
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        wait_ready(base, "none", model=model, timeout_s=600)
        warm = argparse.Namespace(**{**vars(a), "duration_s": min(40.0, a.duration_s)})
        asyncio.run(interactive(base, model, warm, a.seed + 99))  # not measured
        ttfts: dict[str, list[float]] = {"alone": [], "backlog": []}
        rounds, done, elapsed = [], 0, 0.0
        for r in range(a.rounds):
            alone = asyncio.run(interactive(base, model, a, a.seed + r))
            client, batch_id = backlog(base, model, a)
            done_before = client.batches.retrieve(batch_id).request_counts.completed
            started = time.monotonic()
            busy = asyncio.run(interactive(base, model, a, a.seed + r))
            elapsed += time.monotonic() - started
            done += client.batches.retrieve(batch_id).request_counts.completed - done_before
            client.batches.cancel(batch_id)
            ttfts["alone"] += alone
            ttfts["backlog"] += busy
            rounds.append({"alone": figures(alone), "backlog": figures(busy)})
        serve.delete(APP_NAME)
    phases = {name: figures(values) for name, values in ttfts.items()}
    p99 = phases["alone"]["ttft_p99"], phases["backlog"]["ttft_p99"]
    return {
        "settings": settings(a),
        "phases": phases,
        "rounds": rounds,
        "p99_ratio": _r(p99[1] / p99[0]) if p99[0] and p99[1] else None,
        "batch_requests_completed": done,
        "batch_requests_per_s": _r(done / elapsed) if elapsed else None,
    }


def markdown(report: dict[str, Any]) -> str:
    s, phases = report["settings"], report["phases"]
    rows = [
        f"{s['replicas']} real CPU engines of {s['max_num_seqs']} sequences (priority "
        f"scheduling); interactive streamed chats at {s['rate']} requests/s of "
        f"{s['prompt_words']} words, {s['max_tokens']} tokens out; a backlog of "
        f"{s['batch_requests']} batch chats of {s['batch_max_tokens']} tokens at "
        f"`max_concurrent: {s['batch_concurrency']}`; {s['duration_s']:g} s a phase, "
        f"{s['rounds']} rounds alternated (figures over every round's requests).",
        "",
        "| phase | interactive answered | TTFT p50 | p90 | p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in phases.items():
        rows.append(f"| {name} | {f['answered']} | {f['ttft_p50']} s | {f['ttft_p90']} s | "
                    f"{f['ttft_p99']} s |")  # fmt: skip
    rows += [
        "",
        f"p99 ratio (backlog / alone): {report['p99_ratio']} (target <= 1.2); batch requests "
        f"completed during the backlog phases: {report['batch_requests_completed']} "
        f"({report['batch_requests_per_s']}/s).",
    ]
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2, help="Real CPU engines.")
    p.add_argument("--max-num-seqs", type=int, default=4, help="Sequences per engine.")
    p.add_argument("--rate", type=float, default=0.5, help="Interactive requests/s.")
    p.add_argument("--duration-s", type=float, default=120.0, help="Length of each phase.")
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=24, help="Interactive output tokens.")
    p.add_argument("--batch-requests", type=int, default=400)
    p.add_argument("--batch-max-tokens", type=int, default=64)
    p.add_argument("--batch-concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="Alone/backlog phase pairs.")
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main("batch_interference", parser(), run, markdown,
         failed=lambda report: (report["p99_ratio"] or 99) > 1.2)  # fmt: skip
