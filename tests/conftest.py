"""Shared test fixtures and paths; `cluster` is a real Ray cluster (in this process) with Ray
Serve, shared by the end-to-end tests and the benchmarks' smoke tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.stack_env import new_run, sweep
from benchmarks.processes import free_port, serve_env

# The stack's high-throughput mode for every Ray process the tests start (read at start-up, so
# set before anything imports Ray Serve); every such process carries the session's mark.
RUN = new_run()
os.environ.update(serve_env(RUN))
ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = ROOT / "serve_configs"


@pytest.fixture
def cpu_model() -> dict:
    """A valid CPU model entry (as in serve_configs/smollm2-cpu.yaml)."""
    return {
        "name": "smollm2",
        "source": "embedded:smollm2",
        "aliases": ["default"],
        "dtype": "float32",
        "max_model_len": 2048,
        "engine_args": {"enforce_eager": True},
    }


@dataclass
class Cluster:
    http_port: int
    gcs_address: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="vrstack-tests")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield Cluster(port, ray.get_runtime_context().gcs_address)
    finally:
        serve.shutdown()
        ray.shutdown()
        left = sweep(RUN)
        assert not left, f"the test cluster left processes behind: {left}"
