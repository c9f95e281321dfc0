"""`serve run` with a wrong config fails at build time, naming the field, before any engine starts.

Ray's `serve run` keeps waiting after a failed deploy, so the test reads its output and stops it.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SERVE_CONFIGS

pytestmark = pytest.mark.e2e


def test_serve_run_rejects_bad_config_naming_the_field(cluster, tmp_path):
    from ray import serve

    raw = yaml.safe_load((SERVE_CONFIGS / "smollm2-cpu.yaml").read_text())
    raw["http_options"]["port"] = cluster.http_port
    app = raw["applications"][0]
    app["name"], app["route_prefix"] = "badapp", "/bad"
    app["args"]["models"][0]["dtype"] = "float8"
    app["args"]["models"][0]["resources"]["cpu"] = -2
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))

    serve_cli = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen(
        [str(serve_cli), "run", "--address", cluster.gcs_address, str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and not any("models.0.resources.cpu" in s for s in seen):
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = "".join(seen)
    assert "invalid vllm-ray-stack config (2 error(s))" in output, output[-3000:]
    assert "models.0.dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16'" in output
    assert "(got 'float8')" in output
    status = serve.status().applications.get("badapp")
    assert status is None or not status.deployments, "no engine deployment was created"
    if status is not None:
        serve.delete("badapp")
