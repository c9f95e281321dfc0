"""Micro-benchmark: the ingress relay's HTTP client against aiohttp's, side by side.

    python -m benchmarks.relay_client --requests 3000 --rounds 3

Both clients post the overhead benchmark's streamed completion (`max_tokens` 16) to the
zero-compute HTTP simulator (`benchmarks.sim_server`, its own process) and read each answer to
its end, on uvloop as Ray Serve's replicas run, at 1 and 50 requests at once; rounds alternate
the clients' order. Reported: this process's CPU time (user + system) per request, which is
what the client costs the ingress, and the wall time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from app.ingress.relay import Relay
from benchmarks.processes import free_port, log_tail, stop

BODY = json.dumps({
    "model": "default", "prompt": "word " * 32, "max_tokens": 16, "stream": True,
}).encode()  # fmt: skip
PATH = "/v1/completions"
Request = Callable[[], Awaitable[int]]


def ours(url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    relay = Relay("token", timeout_s=30)

    async def one() -> int:
        response = await relay.send(url, PATH, BODY, "bench")
        size = 0
        try:
            async for piece in response.chunks():
                size += len(piece)
        finally:
            response.release()
        return size

    return one, relay.close


def with_aiohttp(url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False
    )
    headers = {"x-vrstack-token": "token", "content-type": "application/json"}

    async def one() -> int:
        async with session.post(url + PATH, data=BODY, headers=headers) as response:
            size = 0
            async for piece in response.content.iter_any():
                size += len(piece)
        return size

    return one, session.close


CLIENTS = {"ours": ours, "aiohttp": with_aiohttp}


async def measure(make, url: str, requests: int, concurrency: int) -> dict[str, float]:
    one, close = make(url)
    try:
        for _ in range(100):
            await one()
        slots = asyncio.Semaphore(concurrency)

        async def limited() -> int:
            async with slots:
                return await one()

        cpu, wall = time.process_time(), time.perf_counter()
        sizes = await asyncio.gather(*(limited() for _ in range(requests)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await close()
    assert min(sizes) > 0
    return {"cpu_ms": cpu / requests * 1e3, "wall_ms": wall / requests * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", dest="json_out", type=Path)
    args = p.parse_args()

    port = free_port()
    log = Path(f"/tmp/relay-client-sim-{port}.log")
    with open(log, "w") as logf:
        sim = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sim_server", "--ports", str(port),
             "--prefill-cost", "0", "--prefill-overhead", "0", "--decode-cost", "0",
             "--max-concurrency", "1000000"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[int, list[dict[str, float]]]] = {c: {1: [], 50: []} for c in CLIENTS}
    try:
        for _ in range(100):
            time.sleep(0.1)
            try:
                uvloop.run(measure(ours, url, 1, 1))
                break
            except Exception:  # not listening yet
                if sim.poll() is not None:
                    raise SystemExit(f"the simulator exited: {log_tail(log)}") from None
        for turn in range(args.rounds):
            order = list(CLIENTS) if turn % 2 == 0 else list(reversed(CLIENTS))
            for concurrency in (1, 50):
                for name in order:
                    run = uvloop.run(measure(CLIENTS[name], url, args.requests, concurrency))
                    results[name][concurrency].append(run)
    finally:
        stop(sim)
    print(f"{args.requests} requests per client per level, {args.rounds} rounds; medians, ms")
    print("| client | at 1: CPU/request | wall/request | at 50: CPU/request | wall/request |")
    print("|---|---:|---:|---:|---:|")
    for name, levels in results.items():
        cells = [
            f"{statistics.median(run[key] for run in levels[c]):.3f}"
            for c in (1, 50)
            for key in ("cpu_ms", "wall_ms")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"settings": vars(args) | {"json_out": None},
                                             "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
