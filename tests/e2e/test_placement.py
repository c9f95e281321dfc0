"""Placement on a Ray cluster shaped like the rendered minimal manifest (`kuberay/opt125m.yaml`):
the ingress cannot take the engine's node, and the stack serves once each is on its own node.

A local multi-node cluster (`ray.cluster_utils.Cluster`) stands in for the KubeRay pods: a head
and one node per worker group, each advertising the Ray resources KubeRay would start it with,
read from the rendered RayService by Ray's own KubeRay autoscaler code (container limits,
`rayStartParams`, custom resources). The engine is the simulated one
(`benchmarks.simulated_engine`) with the placement group Ray Serve LLM gives the real engine, and
the stack's config is the rendered `serveConfigV2`'s. Only the engine's node is there at first,
its GPU held by another placement group, so its CPUs are free (as when the GPU pod joins before
the engine's placement group is made): the ingress must not take them. Once the GPU is free the
engine must start there, the ingress still waiting; then the ingress node joins, the ingress
lands on it, and a completion is answered. (Before the ingress was pinned, it took 0.5 of the
engine pod's 6 CPUs and the engine's placement group, which asks for all 6, never fit.)

The cluster runs in a child process of its own (its own Ray temp folder and run mark; the
tests' shared cluster may be up in this one), bounded in time, and nothing it started outlives
the test.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from app.stack_env import new_run, sweep
from benchmarks.processes import free_port, serve_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serve_configs" / "opt125m.yaml"
APP = "vrstack"
OBJECT_STORE_BYTES = 100 * 2**20  # each node's; what Ray accepts as a minimum is 75 MiB
CHILD_TIMEOUT_S = 420
WAIT_S = 120  # for one replica to start
PENDING_S = 10  # how long the ingress has to (wrongly) land on the engine's node


def test_the_ingress_cannot_take_the_engines_node_and_the_stack_serves() -> None:
    run = new_run()
    ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, **serve_env(run), "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.test_placement"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the placement run took over {CHILD_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = sweep(run)
        _kill_with(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(output.strip().splitlines()[-1])
    # the ingress asked for the ingress group's resource, which only that node has
    assert result["ingress_asks"] and set(result["ingress_asks"]) <= set(result["ingress_offers"])
    # the engine's node alone, its CPUs free: the ingress did not take them ...
    assert result["engine_blocked"]["ingress"][0] != "ALIVE", result
    # ... so the engine's placement group fit when it could, and the ingress still waited
    assert "error" not in result, result
    nodes = result["nodes"]
    assert result["engine_alone"]["engine"] == ["ALIVE", nodes["engine"]]
    assert result["engine_alone"]["ingress"][0] != "ALIVE", result["engine_alone"]
    # the ingress node joined: the ingress there, the engine where it was, and an answer
    assert result["both"]["ingress"] == ["ALIVE", nodes["ingress"]]
    assert result["both"]["engine"] == ["ALIVE", nodes["engine"]]
    assert result["completion"]["status"] == 200, result["completion"]
    assert result["completion"]["text"].strip()
    assert not left, f"the placement run left processes behind: {left}"


def _kill_with(ray_tmp: str) -> None:
    """Whatever still runs with this Ray temp folder (never left to the next test)."""
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("RAY_TMPDIR") == ray_tmp:
                proc.kill()


# --- the child process: the cluster, the stack, the observations -----------------------------


def rendered_minimal_stack() -> dict[str, Any]:
    """The RayService rendered from serve_configs/opt125m.yaml (= kuberay/opt125m.yaml)."""
    from app.k8s.render import render_file

    docs = [d for d in yaml.safe_load_all(render_file(CONFIG)) if d]
    return next(d for d in docs if d["kind"] == "RayService")


def advertised(group: dict[str, Any], *, is_head: bool = False) -> dict[str, float]:
    """What a KubeRay group's pods offer Ray, as Ray's KubeRay autoscaler reads the group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _get_ray_resources_from_group_spec,
    )

    return _get_ray_resources_from_group_spec(copy.deepcopy(group), is_head)


def node_args(resources: dict[str, float]) -> dict[str, Any]:
    """`Cluster.add_node` arguments for a node offering `resources`."""
    custom = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
    return {
        "num_cpus": resources.get("CPU", 0),
        "num_gpus": resources.get("GPU", 0),
        "memory": int(resources["memory"]),
        "resources": custom,
        "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False,
    }


def engine_placement(spec: Any) -> dict[str, Any]:
    """The placement group options Ray Serve LLM gives the model's real engine replicas."""
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from app.engines.llm_config import llm_config

    config = llm_config(spec, source=spec.source, skip_noop_download=False)
    options = LLMServer.get_deployment_options(config)
    return {key: options[key] for key in ("placement_group_bundles", "placement_group_strategy")}


def replica_states(deployment: str) -> list[str | None]:
    """[state, node id] of the deployment's replica actor (the last one created)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    found = [a for a in ray._private.state.actors().values() if a["Name"].startswith(prefix)]
    if not found:
        return ["NONE", None]
    actor = max(found, key=lambda a: a["StartTime"] or a["Timestamp"])
    node = actor["Address"]["NodeID"] if actor["State"] == "ALIVE" else None
    return [actor["State"], node]


def _healthy(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    return False


class Background:
    """A call in a daemon thread (one that may never return must not keep the process up)."""

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn: Any, args: tuple, kwargs: dict) -> None:
        try:
            self._outcome.append((fn(*args, **kwargs), None))
        except BaseException as exc:
            self._outcome.append((None, exc))

    def result(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        if not self._outcome:
            raise TimeoutError(f"still running after {timeout_s} s")
        value, error = self._outcome[0]
        if error is not None:
            raise error
        return value


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.5)


def child() -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    from app.config import load_config
    from app.engines.llm_config import deployment_name
    from benchmarks.simulated_engine import simulated_stack

    rayservice = rendered_minimal_stack()
    cluster_spec = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    ingress_group = groups.pop("ingress")
    ((engine_name, engine_group),) = groups.items()
    head = advertised(cluster_spec["headGroupSpec"], is_head=True)
    (app_args,) = [a["args"] for a in yaml.safe_load(rayservice["spec"]["serveConfigV2"])[
        "applications"
    ]]  # fmt: skip
    config = load_config(app_args)  # as the cluster builds it: the rendered args
    (spec,) = config.models

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args(head),
            "gcs_server_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    result: dict[str, Any] = {"ingress_asks": dict(config.server.ingress_resources)}
    offers = advertised(ingress_group)
    result["ingress_offers"] = {k: v for k, v in offers.items() if k in result["ingress_asks"]}
    try:
        engine_node = cluster.add_node(**node_args(advertised(engine_group)))
        ray.init(address=cluster.address, namespace="vrstack-placement")
        serve.start(
            http_options={"host": "127.0.0.1", "port": (port := free_port())},
            proxy_location="HeadOnly",
        )
        # The engine node's GPU held by another placement group: the engine cannot start yet,
        # so its CPUs are free for whatever may take them (on KubeRay: the GPU pod joined
        # before the engine's placement group was made).
        placement = engine_placement(spec)
        gpus = sum(bundle.get("GPU", 0) for bundle in placement["placement_group_bundles"])
        blocker = placement_group([{"GPU": gpus}])
        ray.get(blocker.ready(), timeout=WAIT_S)
        app = simulated_stack(config, engine_options=placement, delay_s=0.01)
        # serve.run returns once every replica runs: here, only after the ingress node joins
        deploying = Background(serve.run, app, name=APP, route_prefix="/")
        engine = deployment_name(spec)
        time.sleep(PENDING_S)  # the ingress had every chance to land on the engine's node
        result["engine_blocked"] = {"ingress": replica_states("ingress")}
        remove_placement_group(blocker)
        wait_for(lambda: replica_states(engine)[0] == "ALIVE", WAIT_S, "the engine did not start")
        result["engine_alone"] = {
            "engine": replica_states(engine),
            "ingress": replica_states("ingress"),
        }
        ingress_node = cluster.add_node(**node_args(offers))
        wait_for(
            lambda: replica_states("ingress")[0] == "ALIVE", WAIT_S, "the ingress did not start"
        )
        deploying.result(WAIT_S)
        result["both"] = {"engine": replica_states(engine), "ingress": replica_states("ingress")}
        result["nodes"] = {"engine": engine_node.node_id, "ingress": ingress_node.node_id}
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(base), WAIT_S, "the stack was not healthy")
        body = {"model": spec.name, "prompt": "Once upon a time,", "max_tokens": 4}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        text = answer.json()["choices"][0]["text"] if answer.status_code == 200 else answer.text
        result["completion"] = {"status": answer.status_code, "text": text}
        result["engine_group"] = engine_name
    except Exception as exc:  # what was seen so far still goes to the test
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    print(json.dumps(child()), flush=True)
