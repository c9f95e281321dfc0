"""The environment a stack's Ray processes run with, and cleaning up after them.

`HIGH_THROUGHPUT` turns on Ray Serve's high-throughput data plane (Ray >= 2.56): HAProxy in front
instead of the Python proxy, each ingress replica on its own port, gRPC between replicas, and
replica code on its event loop. Ray reads it at start-up in every process, so it goes into the
environment of `ray start` (whose raylet starts every worker) and of `serve run`; KubeRay
manifests set it on every container. HAProxy's per-request log parsing (Ray's own `serve_*`
request metrics in that mode) is off, and so are the stack's deployments' access logs: the
stack's `/metrics` counts requests itself.

Every process a `vrstack up` starts carries `VRSTACK_RUN=<id>` in its environment, inherited by
what they start in turn (Ray workers, vLLM engine cores, HAProxy). `leftovers(run)` finds those
still alive after the stack stopped; `sweep(run)` ends them: the Ray head the run started, its
workers, HAProxy and vLLM's engine cores (not Ray processes, they can outlive a stopped Ray), and
nothing else (`ray stop` would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil

HIGH_THROUGHPUT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # Two of the throughput mode's defaults turned back: handle routers keep their own event
    # loop (so Python callers may use a handle from one `asyncio.run` to the next; the HTTP path
    # makes no handle call), and Serve's logs (a build error, say) still reach `serve run`.
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}
RUN_MARK = "VRSTACK_RUN"


def new_run() -> str:
    """A fresh mark for the processes of one `vrstack up`."""
    return uuid.uuid4().hex


def local_env(run: str) -> dict[str, str]:
    """The environment of a single-machine stack: high throughput, engine ports on loopback."""
    return {**HIGH_THROUGHPUT, "VRSTACK_ENGINE_HOST": "127.0.0.1", RUN_MARK: run}


def leftovers(run: str, *, mark: str = RUN_MARK) -> list[psutil.Process]:
    """Live processes (but this one) whose environment carries the run's mark (`mark=run`)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(mark) == run:
                found.append(proc)
    return found


def sweep(
    run: str, *, grace_s: float = 5.0, timeout_s: float = 10.0, mark: str = RUN_MARK
) -> list[str]:
    """What of the run is still alive after `grace_s` (processes still on their way out get
    that long): SIGTERM, then SIGKILL after `timeout_s`; the command lines of what was left.
    `mark` names another variable carrying the run (`benchmarks.gpu_check` marks its own)."""
    deadline = time.monotonic() + grace_s
    while (procs := leftovers(run, mark=mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names.append(" ".join(proc.cmdline())[:120])
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
    return names
