"""`vrstack up` starts the stack on a Ray head of its own and, stopped with SIGTERM, leaves no
process and no listener behind: no vLLM engine core, no HAProxy, no Ray process.

The command runs as a user would run it, in its own session, with a Ray temp folder of its own
(so it starts its own head rather than joining the tests' cluster) and free ports. Every process
it starts inherits that folder in its environment, which is how the test finds them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from app.stack_env import leftovers, new_run
from benchmarks.processes import free_port, serve_env
from tests.conftest import SERVE_CONFIGS

pytestmark = pytest.mark.e2e


def _with(ray_tmp: str) -> list[psutil.Process]:
    """The processes started with `ray_tmp` as their Ray temp folder."""
    return leftovers(ray_tmp, mark="RAY_TMPDIR")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_vrstack_up_stopped_by_sigterm_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    raw = yaml.safe_load((SERVE_CONFIGS / "smollm2-cpu.yaml").read_text())
    raw["http_options"]["port"] = port
    config = tmp_path / "stack.yaml"
    config.write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, **serve_env(new_run()), "RAY_TMPDIR": ray_tmp}
    vrstack = Path(sys.executable).parent / "vrstack"
    proc = subprocess.Popen(
        [str(vrstack), "up", str(config), "--timeout", "600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=1))
                if "ready in" in output[-1]:
                    break
        assert any("ready in" in line for line in output), "".join(output)[-3000:]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert "smollm2" in {card["id"] for card in models["data"]}
        started = {p.name() for p in _with(ray_tmp)}
        assert any("raylet" in name for name in started), started
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, "".join(output)[-3000:]
        time.sleep(2)  # what was stopped is gone, not on its way out
        left = [" ".join(p.cmdline())[:100] for p in _with(ray_tmp)]
        assert not left, left
        assert not _listening(port), f"port {port} still answers"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _with(ray_tmp):  # never leave them to the next test
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
