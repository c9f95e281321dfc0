"""The stacks of the serve configs, deployed on the shared Ray cluster (`tests.conftest`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SERVE_CONFIGS, Cluster


@dataclass
class Stack:
    cluster: Cluster
    app_name: str

    @property
    def base_url(self) -> str:
        return self.cluster.base_url


def wait_healthy(base_url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base_url}/health not 200 within {timeout_s} s")


def deploy(cluster: Cluster, config_file: Path) -> Stack:
    """Deploy the stack application of a serve config file, as `serve run` would build it."""
    from ray import serve

    from app.builder import build_app
    from app.serve_config import read_serve_config

    (app,) = read_serve_config(config_file).apps
    serve.run(build_app(app.config), name=app.name, route_prefix=app.route_prefix)
    wait_healthy(cluster.base_url)
    return Stack(cluster, app.name)


def deploy_two_replicas(
    cluster: Cluster, name: str, policy: str, lora: dict[str, Any] | None = None
) -> Stack:
    """Deploy the embedded model on 2 engine replicas routed by `policy` (with `lora`
    settings, when given), as app `name`, and wait until both run."""
    import copy

    from ray import serve

    from app.builder import build_app
    from app.serve_config import read_serve_config

    (app,) = read_serve_config(SERVE_CONFIGS / "smollm2-cpu.yaml").apps
    args = copy.deepcopy(app.config.model_dump(mode="json"))
    args["models"][0]["replicas"] = 2
    args["router"] = {"policy": policy}
    if lora is not None:
        args["models"][0]["lora"] = lora
    serve.run(build_app(args), name=name, route_prefix="/")
    wait_healthy(cluster.base_url)
    deadline = time.monotonic() + 300
    while (
        httpx.get(f"{cluster.base_url}/health", timeout=5).json()["models"]["smollm2"][
            "running_replicas"
        ]
        < 2
    ):
        assert time.monotonic() < deadline, "the second replica did not start"
        time.sleep(1)
    return Stack(cluster, name)


def undeploy(stack: Stack) -> None:
    from ray import serve

    serve.delete(stack.app_name)


@pytest.fixture(scope="module")
def smollm2(cluster: Cluster) -> Iterator[Stack]:
    stack = deploy(cluster, SERVE_CONFIGS / "smollm2-cpu.yaml")
    yield stack
    undeploy(stack)


@pytest.fixture(scope="module")
def multi_model(cluster: Cluster) -> Iterator[Stack]:
    stack = deploy(cluster, SERVE_CONFIGS / "multi-model.yaml")
    yield stack
    undeploy(stack)
