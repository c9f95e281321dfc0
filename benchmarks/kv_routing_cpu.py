"""Engine-truth vs predicted prefix routing on real CPU engines under cache pressure.

    flock /tmp/vrstack-e2e.lock python -m benchmarks.kv_routing_cpu --json out.json

The embedded model (`serve_configs/smollm2-cpu.yaml`'s settings) on `--replicas` real vLLM CPU
engines whose prefix caches hold `--cache-blocks` blocks of 128 tokens each (vLLM's
`num_gpu_blocks_override`), in the stack's high-throughput mode on an in-process Ray cluster
(`benchmarks.overhead.serve_cluster`; loopback only). One trace, the lab's `shared-prefix`
workload (groups of prompts sharing a long system prompt; more prefix tokens than the engines'
caches hold together), is replayed open loop through the `openai` client (streamed completions,
`--max-tokens` out) once per policy, each on freshly started engines:

- `kv`: routes from the engines' own KV cache events (`app.engines.kv_feed`);
- the predicting policies (`scored`, the default, and `prefix`): an index of what each replica
  should hold, from the prompts the router sent.

Every request asks for its route receipt (`x-route-receipt: 1`), whose predicted cached tokens
are checked against the answer's realised ones: the prediction error is |predicted - realised|
summed over the requests, over their prompt tokens (and its p90 per request).

Per policy: the realised prefix hit rate (the engines' own `usage.prompt_tokens_details.
cached_tokens` over prompt tokens), TTFT p50/p99 (first streamed chunk), and the share of
requests each replica got. The run stops its Ray cluster and everything it started by itself,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import yaml

from app.bench.summary import percentile
from app.lab.workloads import shared_prefix
from benchmarks.command import main, report_options, settings
from benchmarks.overhead import serve_cluster

CONFIG = Path("serve_configs/smollm2-cpu.yaml")
APP_NAME = "kv-routing-cpu"
POLICIES = ("kv", "scored", "prefix")


def stack_args(policy: str, a: argparse.Namespace) -> dict[str, Any]:
    """The serve config's args: `--replicas` engines with small prefix caches, `policy`."""
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    args = app["args"]
    model = args["models"][0]
    model["replicas"] = a.replicas
    model.setdefault("engine_args", {}).update(
        num_gpu_blocks_override=a.cache_blocks,
        max_num_seqs=a.max_num_seqs,
        enable_prompt_tokens_details=True,  # every policy's answers tell their cached tokens
    )
    args["router"] = {"policy": policy}
    return args


def trace(a: argparse.Namespace) -> list[Any]:
    return shared_prefix(
        groups=a.groups,
        prompts_per_group=a.prompts_per_group,
        system_prompt=a.system_words,
        question=a.question_words,
        output=a.max_tokens,
        qps=a.rate,
        seed=a.seed,
    )


async def replay(base: str, model: str, requests: list[Any]) -> list[dict[str, Any]]:
    """Each request at its arrival time: TTFT, prompt and cached tokens, replica."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", timeout=600)
    started = time.perf_counter()

    async def one(request: Any) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, request.t - (time.perf_counter() - started)))
        sent = time.perf_counter()
        out: dict[str, Any] = {"ttft": None, "prompt": 0, "cached": 0, "replica": None}
        raw = client.completions.with_streaming_response.create(
            model=model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_headers={"x-route-receipt": "1"},
        )  # fmt: skip
        async with raw as response:
            out["replica"] = response.headers.get("x-route-replica")
            receipt = json.loads(response.headers.get("x-route-receipt", "{}"))
            out["predicted"] = receipt.get("predicted_cached_tokens")
            async for chunk in await response.parse():
                if out["ttft"] is None and chunk.choices:
                    out["ttft"] = time.perf_counter() - sent
                if chunk.usage is not None:
                    details = chunk.usage.prompt_tokens_details
                    out["prompt"] = chunk.usage.prompt_tokens
                    out["cached"] = (details.cached_tokens or 0) if details else 0
        return out

    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()


def run_policy(policy: str, base: str, a: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from app.builder import build_app
    from benchmarks.quota_soak import wait_ready

    args = stack_args(policy, a)
    model = args["models"][0]["name"]
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    wait_ready(base, "none", model=model, timeout_s=600)
    time.sleep(3)  # every replica up and reporting (the router subscribes to their events)
    results = asyncio.run(replay(base, model, trace(a)))
    serve.delete(APP_NAME)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    prompt = sum(r["prompt"] for r in results)
    shares = Counter(r["replica"] for r in results)
    checked = [r for r in results if r.get("predicted") is not None and r["prompt"]]
    errors = [abs(r["predicted"] - r["cached"]) / r["prompt"] for r in checked]
    return {
        "policy": policy,
        "requests": len(results),
        "prompt_tokens": prompt,
        "cached_tokens": sum(r["cached"] for r in results),
        "hit_rate": round(sum(r["cached"] for r in results) / prompt, 4) if prompt else None,
        "ttft_p50": _r(percentile(ttfts, 50)),
        "ttft_p99": _r(percentile(ttfts, 99)),
        "busiest_share": round(max(shares.values()) / len(results), 3) if results else None,
        # route receipts: predicted vs realised cached tokens, over the prompt tokens
        "predicted_tokens": sum(r["predicted"] for r in checked),
        "prediction_error": _r(
            sum(abs(r["predicted"] - r["cached"]) for r in checked)
            / max(1, sum(r["prompt"] for r in checked))
        ),
        "prediction_error_p90": _r(percentile(errors, 90)),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['replicas']} real CPU engines, each caching {s['cache_blocks']} blocks of 128 tokens; "
        f"`shared-prefix`: {s['groups']} groups x {s['prompts_per_group']} prompts, a "
        f"{s['system_words']}-word system prompt and a {s['question_words']}-word question, "
        f"{s['rate']} requests/s, {s['max_tokens']} tokens out.",
        "",
        "| policy | realised hit rate | cached / prompt tokens | predicted cached | "
        "prediction error (p90) | TTFT p50 | TTFT p99 | busiest replica's share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["policies"]:
        lines.append(
            f"| {r['policy']} | {r['hit_rate']:.3f} | {r['cached_tokens']} / "
            f"{r['prompt_tokens']} | {r['predicted_tokens']} | {r['prediction_error']:.1%} "
            f"({r['prediction_error_p90']:.1%}) | {r['ttft_p50']:.2f} s | {r['ttft_p99']:.2f} s "
            f"| {r['busiest_share']:.2f} |"
        )
    return "\n".join([*lines, ""])


def run(a: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with serve_cluster(None) as port:
        base = f"http://127.0.0.1:{port}"
        results = [run_policy(policy, base, a) for policy in a.policies]
    return {"settings": settings(a), "policies": results}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--replicas", type=int, default=2, help="Real CPU engines.")
    p.add_argument("--cache-blocks", type=int, default=48, help="Prefix cache blocks per engine.")
    p.add_argument("--max-num-seqs", type=int, default=4, help="Sequences per engine.")
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--system-words", type=int, default=400)
    p.add_argument("--question-words", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.5, help="Requests/s (Poisson).")
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main("kv_routing_cpu", parser(), run, markdown)
