"""A stack that no node can hold says so at once: the fitting rule (`app.engines.placement`),
the builder's warning under `serve run`, and `vrstack up` exiting 2 on a machine without the GPU
(leaving no process behind)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from app.builder import build_app
from app.config import ModelSpec, StackConfig, load_config
from app.engines.placement import (
    Demand,
    model_demand,
    shortfalls,
    stack_demands,
    total,
)
from app.serve_config import read_serve_config
from app.stack_env import leftovers, new_run
from benchmarks.processes import free_port, serve_env
from tests.conftest import SERVE_CONFIGS

GiB = 2**30
# A machine like this one, as Ray reports it: no GPU, Ray's bookkeeping resources beside.
CPU_NODE = {"CPU": 8.0, "memory": 15 * GiB, "object_store_memory": 4 * GiB, "node:10.0.0.1": 1}


def stack(name: str) -> StackConfig:
    (app,) = read_serve_config(SERVE_CONFIGS / name).apps
    return app.config


def gpu_node(gpus: int, **extra: float) -> dict[str, float]:
    return {**CPU_NODE, "GPU": float(gpus), **extra}


def test_a_gpu_model_never_fits_a_machine_without_gpu() -> None:
    config = stack("opt125m.yaml")
    (spec,) = config.models
    (short,) = shortfalls(stack_demands(config), [CPU_NODE])
    assert short.reason.startswith(model_demand(spec).describe())
    assert "GPU" in short.resources
    assert f"GPU {spec.resources.gpu:g}" in short.reason


def test_the_cpu_stack_fits_a_machine_without_gpu() -> None:
    assert shortfalls(stack_demands(stack("smollm2-cpu.yaml")), [CPU_NODE]) == []


def test_a_gpu_model_fits_a_gpu_node() -> None:
    assert shortfalls(stack_demands(stack("opt125m.yaml")), [gpu_node(1, memory=32 * GiB)]) == []


def tp2(**resources: Any) -> ModelSpec:
    return ModelSpec(
        name="org/tp2",
        source="org/tp2",
        engine_args={"tensor_parallel_size": 2},
        resources={"gpu": 2, "cpu": 4, "memory": "8Gi", **resources},
    )


def test_one_gpu_bundles_may_spread_over_nodes_but_need_the_gpus_in_all() -> None:
    demand = model_demand(tp2())
    assert shortfalls([demand], [gpu_node(1), gpu_node(1)]) == []  # PACK may spread
    (short,) = shortfalls([demand], [gpu_node(1)])
    assert short.resources == ["GPU"]
    assert short.reason.startswith("together the stack needs")


def test_a_bundle_no_single_node_holds() -> None:
    spec = ModelSpec(name="m", source="org/m", resources={"gpu": 1, "cpu": 6})
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 16.0}]  # the GPU and the CPUs, apart
    (short,) = shortfalls([model_demand(spec)], nodes)
    assert "no single node has all of" in short.reason
    assert shortfalls([model_demand(spec)], [*nodes, {"CPU": 6.0, "GPU": 1.0}]) == []


def test_models_that_fit_alone_may_not_fit_together() -> None:
    model = {"source": "org/m", "resources": {"cpu": 5}}
    config = load_config({"models": [{"name": "a", **model}, {"name": "b", **model}]})
    demands = stack_demands(config)
    (short,) = shortfalls(demands, [CPU_NODE])
    assert short.resources == ["CPU"]
    needed = total(b for d in demands for _ in range(d.replicas) for b in d.bundles)
    assert needed["CPU"] > CPU_NODE["CPU"]
    assert shortfalls(demands, [{**CPU_NODE, "CPU": needed["CPU"]}]) == []


def test_an_accelerator_type_needs_a_node_of_that_type() -> None:
    demand = model_demand(tp2(accelerator_type="L4"))
    (short,) = shortfalls([demand], [gpu_node(2)])
    assert short.resources == ["accelerator_type:L4"]
    assert shortfalls([demand], [gpu_node(2, **{"accelerator_type:L4": 1.0})]) == []


def test_replicas_count_but_a_bundle_that_fits_nowhere_fails_even_at_zero() -> None:
    model = {"name": "m", "source": "org/m", "replicas": 3, "resources": {"cpu": 3}}
    demand = model_demand(ModelSpec.model_validate(model))
    assert demand.replicas == 3
    (short,) = shortfalls([demand], [CPU_NODE])  # 3 x 3 CPUs of 8
    assert short.resources == ["CPU"]
    scaled = {**model, "autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    demand = model_demand(ModelSpec.model_validate(scaled))
    assert demand.replicas == 0
    assert shortfalls([demand], [CPU_NODE]) == []
    on_gpu = model_demand(ModelSpec.model_validate({**scaled, "resources": {"gpu": 1}}))
    assert shortfalls([on_gpu], [CPU_NODE])  # never, whatever the replicas


def test_the_ingress_is_part_of_the_stack() -> None:
    config = stack("smollm2-cpu.yaml")
    *_, ingress = stack_demands(config)
    assert isinstance(ingress, Demand)
    assert ingress.per_replica["CPU"] == config.server.ingress_cpus
    assert ingress.replicas == config.server.ingress_replicas


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def serve_warnings() -> Iterator[list[str]]:
    handler = Lines()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


@pytest.mark.e2e
def test_the_builder_warns_once_per_model_no_node_can_hold(cluster, serve_warnings) -> None:
    import ray

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    config = stack("opt125m.yaml")
    build_app(config)
    (line,) = [ln for ln in serve_warnings if ln.startswith("vrstack:")]
    assert model_demand(config.models[0]).describe() in line and "no node has GPU" in line
    serve_warnings.clear()
    build_app(stack("smollm2-cpu.yaml"))
    assert not [ln for ln in serve_warnings if ln.startswith("vrstack:")]


def _with(ray_tmp: str) -> list[psutil.Process]:
    """The processes started with `ray_tmp` as their Ray temp folder."""
    return leftovers(ray_tmp, mark="RAY_TMPDIR")


@pytest.mark.e2e
def test_vrstack_up_exits_2_at_once_without_the_gpu_and_leaves_nothing(tmp_path: Path) -> None:
    """A new user's first try on a CPU-only machine: `vrstack up serve_configs/opt125m.yaml`."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    raw = yaml.safe_load((SERVE_CONFIGS / "opt125m.yaml").read_text())
    raw["http_options"]["port"] = port = free_port()
    config = tmp_path / "opt125m.yaml"
    config.write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, **serve_env(new_run()), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)  # a head of its own, not the tests' cluster
    vrstack = Path(sys.executable).parent / "vrstack"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(vrstack), "up", str(config)],
            env=env, capture_output=True, text=True, timeout=240, start_new_session=True,
        )  # fmt: skip
        took = time.monotonic() - started
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        (spec,) = load_config(raw["applications"][0]["args"]).models
        assert model_demand(spec).describe() in output
        assert "Ray cluster: 1 node" in output and "(no GPU)" in output
        assert "To fix: GPU configs need" in output
        assert "ready in" not in output
        assert took < 120, f"{took:.0f} s to say it"
        time.sleep(2)  # what was stopped is gone, not on its way out
        left = [" ".join(p.cmdline())[:100] for p in _with(ray_tmp)]
        assert not left, left
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} answers"
    finally:
        for proc in _with(ray_tmp):  # never leave them to the next test
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _auth_mode_after_the_rule(tmp_path: Path, **env: str) -> str:
    """RAY_AUTH_MODE in a fresh process (HOME without a token file) after
    `use_token_auth_if_available` (a subprocess: it reconfigures Ray in its process)."""
    code = (
        "import os; from app.ray_internals import use_token_auth_if_available as use; "
        "print(use(), os.environ.get('RAY_AUTH_MODE'))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**base, "HOME": str(tmp_path), **env},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return " ".join(done.stdout.split()[-2:])


def test_up_connects_with_a_token_when_ray_start_would_use_one(tmp_path: Path) -> None:
    """`ray start --head` turns token auth on when a token exists; `vrstack up` follows the same
    rule so that `serve run --address` (and its own check) can connect to that head."""
    assert _auth_mode_after_the_rule(tmp_path) == "False None"
    assert _auth_mode_after_the_rule(tmp_path, RAY_AUTH_TOKEN="x" * 32) == "True token"
    assert _auth_mode_after_the_rule(tmp_path, RAY_AUTH_MODE="disabled") == "False disabled"
