"""Start-up time: from the README's serve command to the first answer, and where it goes.

    flock -x -w 3600 /tmp/vrstack-ray.lock flock /tmp/vrstack-bench.lock \\
        python -m benchmarks.startup --runs cold,warm --markdown out.md

Each run starts `vrstack up CONFIG` (what `make serve` runs) with Ray not running, polls
`POST /v1/completions` (1 token) until it answers 200, then stops the stack with Ctrl-C (SIGINT),
which also stops the Ray head it started. *cold*: an empty ``VRSTACK_CACHE`` (a temporary folder,
so the embedded model is converted); *warm*: the same folder again (model already converted).

The breakdown comes from timestamps: the launcher's own lines (stamped here on arrival) and the
serve log (`~/.cache/.../logs/serve-*.log`, each line stamped by the launcher when `serve run`
printed it; engine replica lines reach it through Ray's log forwarding, up to ~1 s late). Each
phase runs from the previous event to the next one, in time order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app.launcher import running_cluster, tool
from app.serve_config import read_serve_config

DEFAULT_CONFIG = Path("serve_configs/smollm2-cpu.yaml")

# (event, pattern): the first line matching the pattern marks the event.
LAUNCHER_EVENTS: tuple[tuple[str, str], ...] = (
    ("model converted (launcher)", r"✓ model "),
    ("Ray head started (launcher)", r"✓ Ray head started"),
    ("health 200 (launcher: ready)", r"✓ ready in"),
)
SERVE_LOG_EVENTS: tuple[tuple[str, str], ...] = (  # `serve run`'s output, stamped on arrival
    ("serve run connected, first output", r""),
    ("engine replica: vLLM config resolved", r"Resolved architecture"),
    ("EngineCore process started (spawned, imports vLLM)", r"Initializing a V1 LLM engine"),
    ("worker process started (spawned), weight load begins", r"Starting to load model"),
    ("weights loaded", r"Loading weights took"),
    ("KV cache allocated, model warmed up", r"init engine \(profile, "),
)
RAY_SERVE_EVENTS: tuple[tuple[str, str], ...] = (  # Ray's serve logs (controller, replicas)
    ("Serve controller started", r"Controller starting"),
    ("controller: app build begins", r"Importing and building app"),
    ("controller: app built (imports ray.serve.llm, vLLM)", r"Imported and built app"),
    (
        "controller: engine replica actor requested",
        r"Starting Replica\(id='\w+', deployment='engine:",
    ),
    (
        "engine replica: process up, class imported",
        r"engine:\S+ \w+ -- Started initializing replica",
    ),
    ("engine replica: Ray LLM download task starts", r"Running tasks to download model files"),
    ("engine replica: executor chosen", r"Using executor class"),
    ("engine replica: vLLM engine started", r"Started vLLM engine"),
    ("engine replica: initialized", r"engine:\S+ \w+ -- Finished initializing replica"),
    ("controller: engine replica RUNNING", r"deployment='engine:[^']*'.*started successfully"),
)
# Durations vLLM reports itself (seconds), for the profile.
VLLM_REPORTED: tuple[tuple[str, str], ...] = (
    ("weight load (vLLM)", r"Loading weights took ([0-9.]+) seconds"),
    ("profile + KV cache + warm-up (vLLM)", r"init engine \(profile, [^)]*\) took ([0-9.]+) s"),
)
_STAMPS = (  # the launcher's prefix of serve-run lines; Ray's serve log lines
    (re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) (.*)$"), "%Y-%m-%dT%H:%M:%S.%f"),
    (re.compile(r"^[A-Z]+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$"), "%Y-%m-%d %H:%M:%S,%f"),
)
RAY_SERVE_LOGS = Path("/tmp/ray/session_latest/logs/serve")


@dataclass(slots=True)
class Event:
    name: str
    at: float  # epoch seconds


def parse_stamped(lines: Iterable[str]) -> list[tuple[float, str]]:
    """(epoch seconds, text) of each line that starts with a time stamp (the launcher's or
    Ray's); other lines are left out."""
    out = []
    for line in lines:
        for pattern, fmt in _STAMPS:
            if m := pattern.match(line.rstrip("\n")):
                out.append((datetime.strptime(m.group(1), fmt).timestamp(), m.group(2)))
                break
    return out


def ray_serve_lines(since: float, folder: Path = RAY_SERVE_LOGS) -> list[tuple[float, str]]:
    """Stamped lines of Ray's serve logs (controller and replicas) written since `since`."""
    lines: list[tuple[float, str]] = []
    for path in sorted(folder.glob("*.log")) if folder.is_dir() else []:
        if path.stat().st_mtime >= since:
            lines += parse_stamped(path.read_text(errors="replace").splitlines())
    return sorted(line for line in lines if line[0] >= since)


def find_events(
    lines: Iterable[tuple[float, str]], patterns: Sequence[tuple[str, str]]
) -> list[Event]:
    """The first time each pattern matched (events that never happened are left out)."""
    compiled = [(name, re.compile(p)) for name, p in patterns]
    found: dict[str, float] = {}
    for at, text in lines:
        for name, pattern in compiled:
            if name not in found and pattern.search(text):
                found[name] = at
    return [Event(name, at) for name, at in found.items()]


def reported_durations(lines: Iterable[tuple[float, str]]) -> dict[str, float]:
    """The durations vLLM logs about itself (first occurrence of each)."""
    out: dict[str, float] = {}
    for _at, text in lines:
        for name, pattern in VLLM_REPORTED:
            if name not in out and (m := re.search(pattern, text)):
                out[name] = float(m.group(1))
    return out


def phases(t0: float, events: Sequence[Event]) -> list[dict[str, Any]]:
    """Consecutive phases in time order: each from the previous event (or t0) to its event."""
    out, prev = [], t0
    for ev in sorted(events, key=lambda e: e.at):
        out.append({"until": ev.name, "at_s": ev.at - t0, "duration_s": max(0.0, ev.at - prev)})
        prev = max(prev, ev.at)
    return out


def _read_lines(stream, sink: list[tuple[float, str]]) -> None:
    for line in stream:
        sink.append((time.time(), line.rstrip("\n")))


def _answers(client: httpx.Client, url: str, model: str) -> bool:
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    try:
        return client.post(url, json=body).status_code == 200
    except httpx.HTTPError:
        return False


def measure(label: str, config: Path, cache: Path, timeout_s: float) -> dict[str, Any]:
    """One start of `vrstack up config` with VRSTACK_CACHE=cache, to the first answer."""
    if running_cluster():
        raise RuntimeError("a Ray cluster is running: start-up runs need Ray stopped")
    loaded = read_serve_config(config)
    model = loaded.apps[0].config.models[0].name
    url = f"http://{loaded.http_host}:{loaded.http_port}/v1/completions"
    env = {**os.environ, "VRSTACK_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    launcher_lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = subprocess.Popen(
        [tool("vrstack"), "up", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, launcher_lines), daemon=True)
    reader.start()
    answered: float | None = None
    try:
        with httpx.Client(timeout=30) as client:
            while time.time() - t0 < timeout_s and proc.poll() is None:
                if _answers(client, url, model):
                    answered = time.time()
                    break
                time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # vrstack up stops serve run and its Ray head
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    logs = sorted((cache / "logs").glob("serve-*.log"), key=lambda p: p.stat().st_mtime)
    serve_lines = parse_stamped(logs[-1].read_text().splitlines()) if logs else []
    events = (
        find_events(launcher_lines, LAUNCHER_EVENTS)
        + find_events(serve_lines, SERVE_LOG_EVENTS)
        + find_events(ray_serve_lines(t0), RAY_SERVE_EVENTS)
    )
    if answered is not None:
        events.append(Event("first answer (POST /v1/completions 200)", answered))
    return {
        "run": label,
        "first_answer_s": None if answered is None else answered - t0,
        "phases": phases(t0, events),
        "vllm_reported_s": reported_durations(serve_lines),
        "launcher_output": [f"{at - t0:7.2f} {text}" for at, text in launcher_lines],
        "serve_log": str(logs[-1]) if logs else None,
    }


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """A table per run: first-answer time, then each phase."""
    out = []
    for r in results:
        total = r["first_answer_s"]
        out += [
            f"**{r['run']}**: first answer after "
            + ("(none: timed out)" if total is None else f"**{total:.1f} s**"),
            "",
            "| phase (until ...) | at (s) | took (s) |",
            "|---|---:|---:|",
        ]
        out += [f"| {p['until']} | {p['at_s']:.1f} | {p['duration_s']:.1f} |" for p in r["phases"]]
        for name, secs in r["vllm_reported_s"].items():
            out.append(f"| (inside) {name} | | {secs:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", default="cold,warm", help="comma-separated: cold, warm")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the tables as markdown")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="vrstack-startup-") as tmp:
        cache = Path(tmp)
        for run in args.runs.split(","):
            if run not in ("cold", "warm"):
                parser.error(f"unknown run {run!r}; use cold and/or warm")
            if run == "cold":
                cache = Path(tempfile.mkdtemp(dir=tmp))  # empty: the model gets converted
            elif not (cache / "models").is_dir():  # warm needs the converted model (untimed)
                env = {**os.environ, "VRSTACK_CACHE": str(cache)}
                subprocess.run([tool("vrstack"), "prepare-model"], check=True, env=env)
            results.append(measure(run, args.config, cache, args.timeout))
            print(markdown(results[-1:]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results))


if __name__ == "__main__":
    main()
