"""Run a serve config locally: a Ray head, `serve run` in the foreground, progress until ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx
from rich.console import Console

from app.engines import embedded
from app.ray_internals import forget_started_cluster, started_cluster_address
from app.serve_config import ServeConfigFile
from app.stack_env import sweep

console = Console(stderr=True)


def tool(name: str) -> str:
    """A console script installed beside this Python (the venv's `ray`, `serve`)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _embedded_to_convert(config: ServeConfigFile) -> list[str]:
    names = {spec.embedded_model for app in config.apps for spec in app.config.models}
    return sorted(n for n in names if n is not None and not embedded.is_prepared(n))


def prepare_models_in_background(config: ServeConfigFile) -> list[threading.Thread]:
    """Start converting the embedded models that need it, each in a `vrstack prepare-model`
    process, so the conversion overlaps the Ray head's start and `serve run`'s deployment.
    An engine replica that needs a model meanwhile waits on the model's file lock
    (`embedded.prepare`). Returns threads that end when each conversion has."""
    threads = []
    for name in _embedded_to_convert(config):
        proc = subprocess.Popen(
            [tool("vrstack"), "prepare-model", name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        console.print(f"Preparing embedded model {name} in the background (once, ~30 s)...")
        thread = threading.Thread(target=_report_conversion, args=(name, proc), daemon=True)
        thread.start()
        threads.append(thread)
    return threads


def _report_conversion(name: str, proc: subprocess.Popen) -> None:
    output = proc.communicate()[0] or ""
    if proc.returncode == 0:
        console.print(f"[green]✓[/] model {name}: {output.strip().splitlines()[-1]}")
    else:
        console.print(f"[red]✗[/] model {name}: conversion failed")
        console.print(output[-2000:], markup=False, highlight=False)


def running_cluster() -> str | None:
    """The address of the Ray cluster `vrstack up` would join: `RAY_ADDRESS`, else the one the
    last `ray start --head` made (if its GCS port answers), else None. Other Ray processes on
    the machine (a notebook's `ray.init()`) are not joined, nor stopped."""
    address = os.environ.get("RAY_ADDRESS") or started_cluster_address()
    if not address or address.startswith(("ray://", "local")):
        return address or None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return None
    return address


def start_ray_head(num_cpus: int, env: dict[str, str]) -> str:
    """`ray start --head` with `env` added to its environment (and so to every Ray worker's);
    returns the new cluster's address."""
    with console.status(f"Starting a local Ray head ({num_cpus} logical CPUs)..."):
        subprocess.run(
            [tool("ray"), "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats",
             "--include-dashboard=false"],
            check=True, capture_output=True, timeout=180, env={**os.environ, **env},
        )  # fmt: skip
    address = started_cluster_address()
    if address is None:
        raise RuntimeError("`ray start --head` left no cluster address")
    console.print("[green]✓[/] Ray head started")
    return address


def stop_ray(run: str) -> None:
    """End the processes of the run (`app.stack_env.sweep`): the Ray head this run started, its
    workers and what they started. Unlike `ray stop`, other Ray clusters on the machine live on."""
    left = sweep(run, grace_s=0, timeout_s=16)
    forget_started_cluster()
    if left:
        console.print(f"stopped {len(left)} Ray process(es) of this run")


def stamp(at: float | None = None) -> str:
    """Wall-clock prefix of each log line (`benchmarks.startup` reads it back)."""
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def _pump(stream, log, tail: deque[str]) -> None:
    for line in stream:
        log.write(f"{stamp()} {line}")
        log.flush()
        if line.strip():
            tail.append(line.rstrip())


def _health(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def serve_foreground(
    config: ServeConfigFile,
    *,
    address: str,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str],
) -> int:
    """`serve run` the config (with `env`); show progress until /health answers 200, then
    wait for Ctrl-C."""
    base = f"http://{config.http_host}:{config.http_port}"
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or `kill`: stop the stack cleanly
        signal.signal(sig, _interrupt)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [tool("serve"), "run", "--address", address, str(config.path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        threading.Thread(target=_pump, args=(proc.stdout, log, tail), daemon=True).start()
        try:
            ready = _wait_ready(proc, f"{base}/health", tail, started, timeout_s)
            if not ready:
                console.print(f"[red]✗[/] not ready; last lines of {log_path}:")
                console.print("\n".join(list(tail)[-25:]), markup=False, highlight=False)
                return 1
            console.print(
                f"[green]✓[/] ready in {time.monotonic() - started:.0f} s at {base}  "
                f"(logs: {log_path})\n  curl {base}/v1/models\n  Ctrl-C stops the stack."
            )
            return proc.wait()
        except KeyboardInterrupt:
            console.print("stopping...")
            return 0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_ready(proc, url: str, tail: deque[str], started: float, timeout_s: float) -> bool:
    with console.status("") as status:
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                return False
            code = _health(url)
            if code == 200:
                return True
            last = tail[-1][-110:] if tail else "starting serve run..."
            phase = "engines loading" if code == 503 else "deploying"
            status.update(f"[{time.monotonic() - started:4.0f} s] {phase}: {last}")
            time.sleep(1)
    return False
