"""Mid-stream migration on real CPU engines: greedy streams whose engine dies, against the same
streams uninterrupted.

    flock /tmp/vrstack-e2e.lock python -m benchmarks.stream_migration --trials 20 \
        --json benchmarks/results/migration.json

The embedded model (`serve_configs/smollm2-cpu.yaml`'s settings) on 2 real vLLM CPU engines, in
the stack's high-throughput mode on an in-process Ray cluster (`benchmarks.overhead.
serve_cluster`; loopback only). Each trial, alternately a completion and a chat (a different
prompt each), read with the `openai` client, greedy, `--max-tokens` tokens (`ignore_eos`):

1. the stream uninterrupted: its text;
2. the same stream again, the serving replica's `VLLM::EngineCore` process killed after a
   random number of chunks (`--kill-min` to `--kill-max`, seeded): the trial passes when the
   client's text is the uninterrupted one's and the stream carries the migration's comment;
3. until Serve has replaced the replica whose engine died (2 replicas answer again).

Then `--plain` non-streaming trials: the same request uninterrupted, then again with the
engine core of the replica answering it (the one /status shows with a request in flight)
killed `--plain-kill-s` in: nothing reached the client, so the ingress sends it whole to the
other replica; the trial passes when the text is the uninterrupted one's.

The report: trials passed (the target is all of them), the chunks before each kill, the client's
wait for the first chunk after the kill (the continuation's time to first token: a prefill of the
prompt and the tokens sent), and how long Serve took to replace the replica. The run stops its
Ray cluster and everything it started by itself, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

from app.bench.summary import percentile
from benchmarks.command import main, report_options, settings
from benchmarks.overhead import serve_cluster
from benchmarks.processes import engine_core

CONFIG = Path("serve_configs/smollm2-cpu.yaml")
APP_NAME = "migration"
DEPLOYMENT = "engine:smollm2"
MIGRATED = ": vrstack-migrated "
PROMPTS = (
    "The history of the railway in Britain began",
    "Write a short story about a lighthouse keeper who",
    "Explain how a refrigerator keeps food cold:",
    "The three most important inventions of the last century are",
    "Describe the water cycle to a ten-year-old.",
    "A recipe for bread starts with",
    "List the planets of the solar system and one fact about each.",
    "The meeting was about to end when",
    "Why is the sky blue? Answer in detail.",
    "In the year 2050, cities will",
)


def stack_args() -> dict[str, Any]:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    args = copy.deepcopy(app["args"])
    args["models"][0]["replicas"] = 2
    return args


def request(trial: int, max_tokens: int) -> dict[str, Any]:
    """Trial `trial`'s request: a chat on odd trials, a completion on even ones."""
    prompt = PROMPTS[trial % len(PROMPTS)]
    common = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0,
              "extra_body": {"ignore_eos": True}}  # fmt: skip
    if trial % 2:
        return {**common, "messages": [{"role": "user", "content": prompt}]}
    return {**common, "prompt": prompt}


def stream(client: openai.OpenAI, body: dict[str, Any], kill_after: int | None) -> dict[str, Any]:
    """One stream's text (and, with `kill_after`, its engine killed after that many chunks:
    the serving replica, the wait for the first chunk after the kill, the raw SSE lines)."""
    chat = "messages" in body
    create = (client.chat.completions if chat else client.completions).with_streaming_response
    text, killed_at, resumed_s, lines, chunks = "", None, None, [], 0
    with create.create(**body, stream=True) as response:
        replica = response.headers.get("x-route-replica")
        core = engine_core(APP_NAME, DEPLOYMENT, replica) if kill_after is not None else None
        for line in response.iter_lines():
            lines.append(line)
            if not line.startswith("data: {"):
                continue
            chunks += 1
            if killed_at is not None and resumed_s is None:
                resumed_s = time.perf_counter() - killed_at
            for choice in json.loads(line[6:]).get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if core is not None and killed_at is None and chunks >= kill_after:
                core.kill()
                killed_at = time.perf_counter()
    return {"text": text, "replica": replica, "resumed_s": resumed_s, "raw": "\n".join(lines)}


def wait_replaced(base: str, victim: str | None, timeout_s: float = 600) -> float:
    """Until the model has 2 running replicas, the victim not among them, and a request is
    answered; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            model = httpx.get(f"{base}/status", timeout=10).json()["models"][0]
            replicas = set(model.get("replicas") or {})
            if model.get("running_replicas") == 2 and victim not in replicas and len(replicas) == 2:
                body = {"model": "smollm2", "prompt": "hi", "max_tokens": 1}
                if httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200:
                    return time.monotonic() - started
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass
        time.sleep(2)
    raise TimeoutError(f"replica {victim} not replaced within {timeout_s:g} s")


def run_trials(base: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(a.seed)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300, max_retries=0)
    trials = []
    for trial in range(a.trials):
        body = request(trial, a.max_tokens)
        expected = stream(client, body, None)["text"]
        kill_after = rng.randint(a.kill_min, a.kill_max)
        got = stream(client, body, kill_after)
        replaced_s = wait_replaced(base, got["replica"])
        result = {
            "trial": trial,
            "endpoint": "chat" if "messages" in body else "completions",
            "kill_after_chunks": kill_after,
            "identical": got["text"] == expected,
            "migrated": MIGRATED in got["raw"],
            "characters": len(expected),
            "resumed_s": _r(got["resumed_s"]),
            "replaced_s": _r(replaced_s),
        }
        if not result["identical"]:
            result |= {"expected": expected, "got": got["text"]}
        trials.append(result)
        print(json.dumps(result), flush=True)
    return trials


def plain(
    client: openai.OpenAI, base: str, body: dict[str, Any], kill_s: float | None = None
) -> dict:
    """A non-streaming request (with `kill_s`, the engine core of the replica answering it
    killed that long in, found by its in-flight count in /status): its text, the replica that
    answered, the one killed."""
    chat = "messages" in body
    create = (client.chat.completions if chat else client.completions).with_raw_response.create
    out: dict[str, Any] = {}

    def call() -> None:
        raw = create(**body)
        choice = raw.parse().choices[0]
        out["text"] = choice.message.content if chat else choice.text
        out["replica"] = raw.headers.get("x-route-replica")

    thread = threading.Thread(target=call)
    thread.start()
    out["victim"] = None
    if kill_s is not None:
        time.sleep(kill_s)
        replicas = httpx.get(f"{base}/status", timeout=10).json()["models"][0]["replicas"]
        busy = [rid for rid, stats in replicas.items() if stats.get("in_flight")]
        if len(busy) == 1:
            out["victim"] = busy[0]
            engine_core(APP_NAME, DEPLOYMENT, busy[0]).kill()
    thread.join(300)
    return out


def run_plain(base: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    """`--plain` non-streaming trials: each killed mid-generation, against its uninterrupted
    run (nothing reached the client: the ingress sends it whole to the other replica)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=300, max_retries=0)
    trials = []
    for trial in range(a.plain):
        body = request(trial, a.plain_max_tokens)
        expected = plain(client, base, body)
        got = plain(client, base, body, kill_s=a.plain_kill_s)
        replaced_s = wait_replaced(base, got["victim"]) if got["victim"] else None
        result = {
            "trial": trial,
            "endpoint": "chat" if "messages" in body else "completions",
            "killed": got["victim"] is not None,
            "identical": got.get("text") == expected["text"],
            "answered_elsewhere": got.get("replica") not in (None, got["victim"]),
            "replaced_s": _r(replaced_s),
        }
        trials.append(result)
        print(json.dumps(result), flush=True)
    return trials


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    resumed = sorted(t["resumed_s"] for t in trials if t["resumed_s"] is not None)
    return {
        "trials": len(trials),
        "identical": sum(t["identical"] for t in trials),
        "migrated": sum(t["migrated"] for t in trials),
        "resume_wait_p50_s": _r(percentile(resumed, 50)),
        "resume_wait_max_s": _r(max(resumed, default=None)),
        "replaced_p50_s": _r(percentile(sorted(t["replaced_s"] for t in trials), 50)),
    }


def plain_summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    killed = [t for t in trials if t["killed"]]
    return {
        "trials": len(trials),
        "killed": len(killed),
        "identical": sum(t["identical"] for t in killed),
        "answered_elsewhere": sum(t["answered_elsewhere"] for t in killed),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def markdown(report: dict[str, Any]) -> str:
    s, a = report["summary"], report["settings"]
    return "\n".join([
        f"2 real CPU engines; greedy streams of {a['max_tokens']} tokens (completions and chats "
        f"alternately), the serving engine core killed after {a['kill_min']}-{a['kill_max']} "
        "chunks.",
        "",
        "| trials | text identical to the uninterrupted run | migrated | wait for the first "
        "chunk after the kill, p50 / max | replica replaced, p50 |",
        "|---:|---:|---:|---:|---:|",
        f"| {s['trials']} | {s['identical']} | {s['migrated']} | {s['resume_wait_p50_s']} s / "
        f"{s['resume_wait_max_s']} s | {s['replaced_p50_s']} s |",
        *_plain_rows(report),
    ])  # fmt: skip


def _plain_rows(report: dict[str, Any]) -> list[str]:
    p, a = report.get("plain_summary") or {}, report["settings"]
    if not p.get("trials"):
        return []
    return [
        "",
        f"Non-streaming requests of {a['plain_max_tokens']} tokens, the answering replica's "
        f"engine core killed {a['plain_kill_s']:g} s in:",
        "",
        "| trials | killed mid-generation | answered by the other replica | text identical |",
        "|---:|---:|---:|---:|",
        f"| {p['trials']} | {p['killed']} | {p['answered_elsewhere']} | {p['identical']} |",
    ]


def run(a: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from app.builder import build_app

    logging.getLogger("httpx").setLevel(logging.WARNING)
    with serve_cluster(None) as port:
        base = f"http://127.0.0.1:{port}"
        serve.run(build_app(stack_args()), name=APP_NAME, route_prefix="/")
        wait_replaced(base, None)
        trials = run_trials(base, a)
        plains = run_plain(base, a)
        serve.delete(APP_NAME)
    return {"settings": settings(a), "summary": summary(trials), "trials": trials,
            "plain_summary": plain_summary(plains), "plain_trials": plains}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kill-min", type=int, default=2, help="Fewest chunks before the kill.")
    p.add_argument("--kill-max", type=int, default=40, help="Most chunks before the kill.")
    p.add_argument("--plain", type=int, default=0, help="Non-streaming trials.")
    p.add_argument("--plain-max-tokens", type=int, default=128)
    p.add_argument("--plain-kill-s", type=float, default=3.0, help="The kill, after sending.")
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main(
        "stream_migration",
        parser(),
        run,
        markdown,
        failed=lambda report: (
            report["summary"]["identical"] < report["summary"]["trials"]
            or report["plain_summary"]["identical"] < report["plain_summary"]["killed"]
        ),
    )
