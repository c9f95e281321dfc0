"""Processes of the benchmarks: loopback ports, readiness, stopping, and the peer routers.

Everything started here runs in its own session (process group) on loopback and is stopped with
its whole group, so nothing outlives the benchmark or test that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.stack_env import local_env

ROOT = Path(__file__).resolve().parents[1]  # the repository: `python -m benchmarks.X` runs here


def serve_env(run: str) -> dict[str, str]:
    """The environment of an in-process Ray cluster of tests and benchmarks: the stack's local
    environment (`app.stack_env.local_env`: Ray Serve's high-throughput mode, engine ports on
    loopback, the run's mark), HAProxy's side ports and Serve's fallback proxy on free ports (so
    two clusters on one machine do not collide), and a 1 s drain of stopping ingress replicas
    (Ray waits 30 s by default, for load balancers that tests do not have)."""
    stats, metrics, fallback_http, fallback_grpc = free_ports(4)
    return {
        **local_env(run),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class FrontError(RuntimeError):
    """A router that could not be started."""


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
        "benchmarks.http_router",
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


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> str:
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


@contextmanager
def router_subprocess(
    name: str, workers: list[str], venv: Path, cache_blocks: int, log: Path, start_timeout: float
) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """A peer or stand-in router (`router_command`) ready on a loopback port: (URL, command
    line, process); stopped on exit. FrontError if it does not start or get healthy."""
    port = free_port()
    argv, env = router_command(name, port, workers, venv, cache_blocks)
    with open(log, "w") as logf:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
                cwd=ROOT,
            )
        except OSError as exc:
            raise FrontError(f"cannot start: {exc}") from None
        try:
            url = f"http://127.0.0.1:{port}"
            problem = asyncio.run(wait_ready(url, proc, start_timeout))
            if problem:
                raise FrontError(f"{problem}; log tail: {log_tail(log)}")
            yield url, " ".join([*(f"{k}={v}" for k, v in env.items()), *argv]), proc
        finally:
            stop(proc)


def log_tail(path: Path, n: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:].replace("\n", " | ")


def stop(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM the process's group, wait up to `timeout_s` for the process, then SIGKILL what is
    left of the group (e.g. an engine core or a Ray worker the process did not take down)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def engine_core(app: str, deployment: str, replica_id: str) -> Any:
    """The `VLLM::EngineCore` process (psutil) of a Serve engine replica: the child of the
    replica's process, found by the Serve log file it holds open (named after the replica id)."""
    import psutil

    mark = f"ServeReplica:{app}:{deployment}"
    for proc in psutil.process_iter(["cmdline"]):
        if not any(mark in part for part in proc.info["cmdline"] or []):
            continue
        if any(replica_id in f.path for f in proc.open_files()):
            cores = [c for c in proc.children(recursive=True) if "EngineCore" in c.name()]
            if len(cores) == 1:
                return cores[0]
    raise LookupError(f"no engine core process of replica {replica_id} of {app}:{deployment}")
