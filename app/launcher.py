"""Run a serve config locally: a Ray head, `serve run` in the foreground, progress until ready."""

from __future__ import annotations

import contextlib
import logging
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
import psutil
from rich.console import Console

from app.engines import embedded
from app.ray_internals import forget_started_cluster, started_cluster_address
from app.serve_config import ServeConfigFile
from app.stack_env import leftovers, sweep

console = Console(stderr=True)


def tool(name: str) -> str:
    """A console script installed beside this Python (the venv's `ray`, `serve`)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _embedded_to_convert(config: ServeConfigFile) -> list[str]:
    names = {spec.embedded_model for app in config.apps for spec in app.config.models}
    return sorted(n for n in names if n is not None and not embedded.is_prepared(n))


def prepare_models_in_background(
    config: ServeConfigFile, env: dict[str, str] | None = None
) -> list[threading.Thread]:
    """Start converting the embedded models that need it, each in a `vrstack prepare-model`
    process (with `env` added: the run's mark, so `stop_ray` ends it too), so the conversion
    overlaps the Ray head's start and `serve run`'s deployment. An engine replica that needs a
    model meanwhile waits on the model's file lock (`embedded.prepare`). Returns threads that
    end when each conversion has."""
    threads = []
    for name in _embedded_to_convert(config):
        proc = subprocess.Popen(
            [tool("vrstack"), "prepare-model", name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
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


class RayHeadFailed(Exception):
    """`ray start --head` did not start a cluster (its last words in the message)."""


def start_ray_head(num_cpus: int, env: dict[str, str]) -> str:
    """`ray start --head` with `env` added to its environment (and so to every Ray worker's);
    returns the new cluster's address."""
    with console.status(f"Starting a local Ray head ({num_cpus} logical CPUs)..."):
        started = subprocess.run(
            [tool("ray"), "start", "--head", f"--num-cpus={num_cpus}", "--disable-usage-stats",
             "--include-dashboard=false"],
            capture_output=True, text=True, timeout=180, env={**os.environ, **env},
        )  # fmt: skip
    if started.returncode != 0:
        said = "\n".join((started.stderr or started.stdout).strip().splitlines()[-5:])
        raise RayHeadFailed(f"`ray start --head` failed (exit {started.returncode}):\n{said}")
    address = started_cluster_address()
    if address is None:
        raise RuntimeError("`ray start --head` left no cluster address")
    console.print("[green]✓[/] Ray head started")
    return address


class ClusterUnreachable(Exception):
    """The Ray cluster `vrstack up` would deploy to does not answer."""


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """The total resources of each alive node of the Ray cluster at `address` (connects as a
    Ray driver for a moment)."""
    import ray

    from app.engines import placement

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:  # what ray.init raises (an auth failure included)
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    try:
        return placement.cluster_nodes()
    finally:
        ray.shutdown()


HINTS = {
    "GPU": "GPU configs need a machine (or Ray cluster) with NVIDIA GPUs and "
    "`pip install -e .[gpu]`; without one, try `vrstack up serve_configs/smollm2-cpu.yaml`",
    "CPU": "give the local Ray head more logical CPUs (`vrstack up --num-cpus N`; more than "
    "the cores is fine) or lower the models' resources.cpu",
    "memory": "lower the models' resources.memory (Ray counts the memory this machine has free)",
    "accelerator_type": "run where Ray finds that GPU type, or remove resources.accelerator_type",
}


def check_resources(config: ServeConfigFile, nodes: list[dict[str, float]]) -> list[str]:
    """Print what each model needs and what the cluster has; return what can never start
    there (`placement.shortfalls`), each printed with how to fix it."""
    from app.engines import placement

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    for app in config.apps:
        for spec in app.config.models:
            say(f"  {placement.model_demand(spec).describe()}")
    say(f"  Ray cluster: {placement.describe_cluster(nodes)}")
    demands = [d for app in config.apps for d in placement.stack_demands(app.config)]
    problems = placement.shortfalls(demands, nodes)
    for problem in problems:
        say(f"✗ {problem.reason}")
    for key in dict.fromkeys(key for problem in problems for key in problem.resources):
        say(f"  To fix: {HINTS.get(key.partition(':')[0], f'start Ray with the resource {key}')}")
    return [problem.reason for problem in problems]


def stop_ray(run: str) -> None:
    """End the processes of the run (`app.stack_env.sweep`): the Ray head this run started, its
    workers and what they started. Unlike `ray stop`, other Ray clusters on the machine live on.
    Ray's agents retitle themselves (setproctitle), which can overwrite the environment the
    run's mark is read from, so the processes the marked ones started are ended too."""
    family = {child for proc in leftovers(run) for child in _children(proc)}
    left = sweep(run, grace_s=0, timeout_s=16)
    strays = [proc for proc in family if proc.is_running()]
    for proc in strays:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(strays, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    forget_started_cluster()
    if left or strays:
        console.print(f"stopped {len(left) + len(strays)} Ray process(es) of this run")


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


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
