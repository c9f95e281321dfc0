"""A soak: mixed load with random client disconnects through the real stack, watching the ingress.

`python -m benchmarks.soak --minutes 30` starts an in-process Ray cluster in the stack's
high-throughput mode (`benchmarks.overhead.serve_cluster`; loopback only) with the stack in front
of `SimulatedEngine` replicas (HAProxy -> our ingress -> request router -> the replicas' own
ports), then keeps `--concurrency` clients busy for `--minutes`. Each request is a completion or
a chat, streamed or not, of random prompt and answer length; `--disconnect` of them are cancelled
after a random part of their answer time (the client closes its connection). Every answer head is
checked as it arrives: one `x-request-id`, and an error body in OpenAI's shape. Every
`--sample-s` seconds it reads the ingress replica's RSS and open file descriptors (psutil).

The report: counts by outcome, 5xx and shape violations, the least-squares slope of RSS and fds
over the second half of the run (per hour), and the requests still in flight at the ingress and
the replicas once the load has stopped. The run stops its Ray cluster and everything it started
by itself, also on Ctrl-C or SIGTERM; it exits 1 when a request failed (5xx, a broken stream, a
time-out) or an answer broke the shape.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from app.bench.load import BenchConfig, build_body, make_client, send_request, words
from app.bench.summary import RequestRecord
from benchmarks.command import main, report_options, settings, stop
from benchmarks.overhead import replica_pid, serve_cluster, wait_answering

MODEL = "sim"
APP_NAME = "soak"
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass
class Tally:
    """What the answers were: outcomes, HTTP statuses, and the answers without exactly one
    `x-request-id` or with an error body not in OpenAI's shape (the first few kept)."""

    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    bad_ids: int = 0
    bad_errors: int = 0
    examples: list[str] = field(default_factory=list)

    async def check(self, response: httpx.Response) -> None:
        """httpx response hook: count the status; check the id and an error's shape."""
        self.statuses[response.status_code] += 1
        where = f"{response.request.url.path} {response.status_code}"
        ids = response.headers.get_list("x-request-id")
        if len(ids) != 1:
            self.bad_ids += 1
            self._example(f"{where}: x-request-id {ids}")
        if response.status_code >= 400:
            body = await response.aread()
            try:
                error = json.loads(body)["error"]
                shaped = set(error) == ERROR_FIELDS and isinstance(error["message"], str)
            except (ValueError, KeyError, TypeError):
                shaped = False
            if not shaped:
                self.bad_errors += 1
                self._example(f"{where}: error body {body[:200]!r}")

    def _example(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)

    def failures(self) -> int:
        """Requests that neither succeeded nor were dropped by their client on purpose."""
        return sum(n for outcome, n in self.outcomes.items() if outcome not in ("ok", "left"))


def slope_per_hour(samples: list[dict[str, float]], key: str) -> float | None:
    """Least-squares slope of `key` against time over the second half of `samples`, per hour."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return None
    ts, ys = [s["t"] for s in half], [s[key] for s in half]
    t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - t_mean) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys, strict=True)) / var * 3600


async def sample(proc: psutil.Process, every_s: float, t0: float, out: list[dict[str, float]]):
    """Append the process's RSS (MiB) and open fds to `out` every `every_s` s until cancelled."""
    while True:
        with proc.oneshot():
            rss, fds = proc.memory_info().rss / 2**20, proc.num_fds()
        out.append({"t": round(time.monotonic() - t0, 2), "rss_mib": round(rss, 2), "fds": fds})
        await asyncio.sleep(every_s)


async def client_loop(
    a: argparse.Namespace, client: httpx.AsyncClient, tally: Tally, seed: int, until: float
) -> None:
    """Requests back to back until `until`: random kind and size, some dropped midway."""
    rng = random.Random(seed)
    base = BenchConfig(model=MODEL, timeout=a.request_timeout)
    while time.monotonic() < until:
        endpoint = rng.choice(("completions", "chat"))
        cfg = dataclasses.replace(base, endpoint=endpoint, stream=rng.random() < a.stream_share)
        body = build_body(cfg, None, words(rng, rng.randint(4, 200)), rng.randint(1, a.max_tokens))
        record = RequestRecord(start=0.0)
        sending = send_request(client, cfg, body, record)
        if rng.random() < a.disconnect:
            try:  # the client leaves after a random part of the answer's time
                await asyncio.wait_for(sending, rng.uniform(0, a.delay_s))
            except asyncio.TimeoutError:
                tally.outcomes["left"] += 1
                continue
        else:
            await sending
        tally.outcomes[record.status] += 1


async def in_flight_after(url: str, timeout_s: float) -> dict[str, Any]:
    """The ingress's and the replicas' in-flight counts (`/status`) once both are 0, or as they
    are after `timeout_s` (replicas report every few seconds)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            status = (await client.get("/status")).json()
            replicas = [r for m in status["models"] for r in m["replicas"].values()]
            counts = {
                "ingress": sum(status["ingress_in_flight"].values()),
                "replicas": sum(r.get("in_flight", 0) for r in replicas),
                "replicas_running": sum(r.get("running", 0) for r in replicas),
            }
            if not any(counts.values()) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(1)


async def soak(a: argparse.Namespace, url: str, ingress: psutil.Process) -> dict[str, Any]:
    """The load and the samples; the report without the settings."""
    tally = Tally()
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    tasks = [asyncio.create_task(sample(ingress, a.sample_s, t0, samples))]
    cfg = BenchConfig(url=url, timeout=a.request_timeout)
    async with make_client(cfg, a.concurrency) as client:
        client.event_hooks = {"request": [], "response": [tally.check]}
        until = t0 + a.minutes * 60
        loops = [client_loop(a, client, tally, a.seed + i, until) for i in range(a.concurrency)]
        tasks += [asyncio.create_task(loop) for loop in loops]
        try:
            _, late = await asyncio.wait(tasks[1:], timeout=a.minutes * 60 + a.request_timeout)
            if late:  # none with a working time-out: counted, not hidden
                tally.outcomes["stuck"] += len(late)
            duration_s = time.monotonic() - t0
            await asyncio.sleep(a.sample_s)  # one sample after the load
        finally:  # also when interrupted: no client outlives the connection pool
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "duration_s": round(duration_s, 1),
        "requests": sum(tally.outcomes.values()),
        "outcomes": dict(tally.outcomes.most_common()),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "5xx": sum(n for status, n in tally.statuses.items() if status >= 500),
        "failures": tally.failures(),
        "shape_violations": {"error_body": tally.bad_errors, "request_id": tally.bad_ids},
        "violation_examples": tally.examples,
        "rss_mib_per_hour": slope_per_hour(samples, "rss_mib"),
        "fds_per_hour": slope_per_hour(samples, "fds"),
        "in_flight_after": await in_flight_after(url, a.settle_s),
        "samples": samples,
    }


def deploy(a: argparse.Namespace) -> None:
    """The stack (one model, `--engine-replicas` simulated replicas) at `/`."""
    from ray import serve

    from app.config import load_config
    from benchmarks.simulated_engine import simulated_stack

    model = {"name": MODEL, "source": f"org/{MODEL}", "replicas": a.engine_replicas}
    config = load_config({"models": [model], "server": {"request_timeout_s": a.request_timeout}})
    app = simulated_stack(config, delay_s=a.delay_s, tokens=None)
    serve.run(app, name=APP_NAME, route_prefix="/")


def run(a: argparse.Namespace, serve_port: int | None = None) -> dict[str, Any]:
    """The whole soak (`serve_port`: on the Serve instance already running there)."""
    from ray import serve

    with serve_cluster(serve_port) as port:
        if serve_port is None:  # after `ray.init`, which puts its own SIGTERM handler in
            signal.signal(signal.SIGTERM, stop)
        url = f"http://127.0.0.1:{port}"
        deploy(a)
        try:
            wait_answering(url, MODEL)
            pid = replica_pid(f"ServeReplica:{APP_NAME}:ingress")
            if pid is None:
                raise RuntimeError("the ingress replica's process was not found")
            report = run_stoppable(soak(a, url, psutil.Process(pid)), serve_port is None)
        finally:
            serve.delete(APP_NAME)
    return {"settings": settings(a), "cpus": psutil.cpu_count(), **report}


def run_stoppable(work: Coroutine[Any, Any, Any], sigterm: bool) -> Any:
    """`asyncio.run(work)`; with `sigterm`, SIGTERM cancels it as Ctrl-C does (then
    KeyboardInterrupt) instead of breaking into the event loop."""

    async def main() -> Any:
        if sigterm:
            task = asyncio.current_task()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await work

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        if sigterm:  # the loop's handler is gone with the loop
            signal.signal(signal.SIGTERM, stop)


def _rate(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    """The report's figures as a markdown table, and the outcomes."""
    s, samples = r["settings"], r["samples"]
    first, last = (samples[0], samples[-1]) if samples else ({}, {})
    after = r["in_flight_after"]
    rows = [
        ("duration", f"{r['duration_s'] / 60:.1f} min"),
        ("requests (left by their client)", f"{r['requests']} ({r['outcomes'].get('left', 0)})"),
        ("5xx", r["5xx"]),
        ("other failures (broken stream, time-out)", r["failures"] - r["5xx"]),
        ("errors not in OpenAI's shape", r["shape_violations"]["error_body"]),
        ("answers without exactly one x-request-id", r["shape_violations"]["request_id"]),
        (
            "ingress RSS, first → last sample",
            f"{first.get('rss_mib', 0):.0f} → {last.get('rss_mib', 0):.0f} MiB",
        ),
        ("ingress RSS slope, second half", f"{_rate(r['rss_mib_per_hour'])} MiB/hour"),
        ("ingress open fds, first → last sample", f"{first.get('fds')} → {last.get('fds')}"),
        ("ingress fds slope, second half", f"{_rate(r['fds_per_hour'])} fds/hour"),
        (
            "in flight after the load (ingress, replicas)",
            f"{after['ingress']}, {after['replicas']}",
        ),
    ]
    out = [
        f"{s['concurrency']} clients, {s['stream_share']:.0%} streamed, {s['disconnect']:.0%} "
        f"dropped midway, {s['engine_replicas']} simulated replicas ({s['delay_s']} s an "
        f"answer, up to {s['max_tokens']} tokens), {len(samples)} samples every {s['sample_s']} s.",
        "",
        "| figure | value |",
        "|---|---:|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "Outcomes: " + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()) + ".",
        "",
    ]
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30, help="How long the load runs.")
    p.add_argument("--concurrency", type=int, default=32, help="Clients, each back to back.")
    p.add_argument("--stream-share", type=float, default=0.5, help="Share of streamed requests.")
    p.add_argument("--disconnect", type=float, default=0.2, help="Share dropped midway.")
    p.add_argument("--delay-s", type=float, default=0.3, help="A simulated answer's time.")
    p.add_argument("--max-tokens", type=int, default=32, help="Answers of 1..N tokens.")
    p.add_argument("--engine-replicas", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=5, help="Seconds between samples.")
    p.add_argument("--request-timeout", type=float, default=60)
    p.add_argument("--settle-s", type=float, default=30, help="Wait for in-flight to reach 0.")
    p.add_argument("--seed", type=int, default=0)
    return report_options(p)


if __name__ == "__main__":
    main(
        "soak",
        parser(),
        run,
        markdown,
        failed=lambda report: bool(report["failures"] or any(report["shape_violations"].values())),
    )
