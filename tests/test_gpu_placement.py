"""Multi-GPU models get one GPU per placement bundle, tensor_parallel_size x pipeline_parallel_size
bundles per replica, checked (no GPU needed) by Ray Serve LLM's and vLLM's own placement code on
the `LLMConfig` the stack builds; the rendered engine pod holds that placement group."""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from vllm.config import ParallelConfig

from app.config import ConfigError, ModelSpec, load_config
from app.config.quantity import parse_quantity
from app.engines.llm_config import llm_config, placement_bundles
from app.engines.placement import fits, total
from app.k8s.render import render_file
from app.k8s.values import import_values
from app.serve_config import read_serve_config
from tests.conftest import SERVE_CONFIGS

# production-stack's tutorials/assets/values-25-v100-multi-gpu-tp2.yaml (the engine's part).
VALUES_25_TP2 = """
servingEngineSpec:
  runtimeClassName: "nvidia"
  modelSpec:
  - name: "qwen7b"
    repository: "vllm/vllm-openai"
    tag: "v0.8.5"
    modelURL: "Qwen/Qwen2.5-7B-Instruct"
    replicaCount: 1
    requestCPU: 8
    requestMemory: "32Gi"
    requestGPU: 2
    pvcStorage: "50Gi"
    vllmConfig:
      dtype: "half"
      tensorParallelSize: 2
      maxModelLen: 8192
      gpuMemoryUtilization: 0.9
      extraArgs:
        - "--enforce-eager"
"""
# production-stack's tutorials/assets/values-15-a-minimal-pipeline-parallel-example-raycluster.yaml
VALUES_15_PP2 = """
servingEngineSpec:
  runtimeClassName: ""
  modelSpec:
  - name: "distilgpt2-raycluster"
    repository: "lmcache/vllm-openai"
    tag: "latest"
    modelURL: "distilbert/distilgpt2"
    replicaCount: 1
    requestCPU: 1
    requestMemory: "20Gi"
    requestGPU: 1
    vllmConfig:
      tensorParallelSize: 1
      pipelineParallelSize: 2
    shmSize: "20Gi"
"""


def imported(values: str, **vllm_config: Any) -> dict[str, Any]:
    """The serve config `vrstack import-values` makes of production-stack values."""
    raw = yaml.safe_load(values)
    raw["servingEngineSpec"]["modelSpec"][0]["vllmConfig"].update(vllm_config)
    return import_values(raw).serve_config


def the_model(serve_config: dict[str, Any]) -> ModelSpec:
    return load_config(serve_config["applications"][0]["args"]).models[0]


def vllm_bundle_check(bundles: list[dict[str, float]], parallel_config: ParallelConfig) -> None:
    """vLLM's check of the placement group its Ray executor runs in: the lines of
    `initialize_ray_cluster` (vllm/v1/executor/ray_utils.py) as they are, with the CUDA
    platform's `device_str`; calling the function itself needs a GPU platform.
    `test_the_vllm_check_is_vllms` keeps the copy in step with the installed vLLM."""
    device_str = "GPU"
    device_bundles = 0
    for bundle in bundles:
        bundle_devices = bundle.get(device_str, 0)
        if bundle_devices > 1:
            raise ValueError(f"Placement group bundle cannot have more than 1 {device_str}.")
        if bundle_devices:
            device_bundles += 1
    if parallel_config.world_size > device_bundles:
        raise ValueError(
            f"The number of required {device_str}s exceeds the total "
            f"number of available {device_str}s in the placement group. "
            f"Required number of devices: {parallel_config.world_size}. "
            f"Total number of devices: {device_bundles}."
        )


def _code(source: str) -> str:
    return "".join(source.split())


def test_the_vllm_check_is_vllms() -> None:
    from vllm.v1.executor import ray_utils

    # The CUDA platform's Ray device (its module imports CUDA kernels, so read, not imported).
    cuda = Path(importlib.util.find_spec("vllm.platforms.cuda").origin).read_text()
    assert 'ray_device_key: str = "GPU"' in cuda
    ours = inspect.getsource(vllm_bundle_check).split('device_str = "GPU"')[1]
    assert _code(ours) in _code(inspect.getsource(ray_utils.initialize_ray_cluster))


def parallel(tensor: int = 1, pipeline: int = 1) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)


def ray_and_vllm_accept(spec: ModelSpec) -> list[dict[str, float]]:
    """The bundles Ray Serve LLM gives the engine of `spec`, once Ray's own validation (the
    `LLMConfig`, `VLLMEngineConfig`, `validate_placement_group`) and vLLM's check passed."""
    from ray.util.placement_group import validate_placement_group

    engine = llm_config(spec, source="unused/for-placement").get_engine_config()
    bundles = engine.placement_bundles
    validate_placement_group(bundles, strategy=engine.placement_strategy)
    args = engine.engine_kwargs
    config = parallel(args.get("tensor_parallel_size", 1), args.get("pipeline_parallel_size", 1))
    assert engine.num_devices == config.world_size  # Ray Serve LLM and vLLM agree
    vllm_bundle_check(bundles, config)
    return bundles


def test_one_bundle_with_two_gpus_is_what_vllm_refuses() -> None:
    with pytest.raises(ValueError, match="cannot have more than 1 GPU"):
        vllm_bundle_check([{"CPU": 8, "GPU": 2}], parallel(tensor=2))


@pytest.mark.parametrize(
    ("values", "vllm_config", "workers"),
    [
        (VALUES_25_TP2, {}, 2),  # tensor parallel 2
        (VALUES_15_PP2, {}, 2),  # pipeline parallel 2 (requestGPU 1 raised to 2 on import)
        (VALUES_25_TP2, {"pipelineParallelSize": 2}, 4),  # both: 4 GPU workers
    ],
    ids=["tp2", "pp2", "tp2xpp2"],
)
def test_production_stack_multi_gpu_models_get_one_gpu_per_bundle(
    values: str, vllm_config: dict[str, Any], workers: int
) -> None:
    spec = the_model(imported(values, **vllm_config))
    assert spec.gpu_workers == workers and spec.resources.gpu == workers
    bundles = ray_and_vllm_accept(spec)
    assert len(bundles) == workers
    assert all(bundle["GPU"] == 1 for bundle in bundles)
    replica = total(bundles)  # the replica's CPUs and memory are all there, once
    assert replica["CPU"] == spec.resources.cpu
    assert replica["memory"] == spec.resources.memory_bytes()


def test_opt125m_keeps_its_single_bundle() -> None:
    (app,) = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").apps
    spec = app.config.models[0]
    res = spec.resources
    bundles = ray_and_vllm_accept(spec)
    assert bundles == [{"CPU": res.cpu, "GPU": res.gpu, "memory": res.memory_bytes()}]


def test_a_fraction_of_a_gpu_stays_one_bundle() -> None:
    spec = ModelSpec(name="m", source="org/m", resources={"gpu": 0.5})
    assert placement_bundles(spec) == [{"CPU": spec.resources.cpu, "GPU": 0.5}]
    ray_and_vllm_accept(spec)


def test_accelerator_type_reaches_every_bundle() -> None:
    spec = the_model(imported(VALUES_25_TP2))
    spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={
        "accelerator_type": "V100"})})  # fmt: skip
    bundles = ray_and_vllm_accept(spec)
    assert all(bundle.get("accelerator_type:V100") for bundle in bundles)


@pytest.mark.parametrize(
    ("resources", "engine_args", "message"),
    [
        ({"gpu": 1}, {"tensor_parallel_size": 2}, "set resources.gpu: 2"),
        ({"gpu": 2}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, "resources.gpu: 4"),
        ({"gpu": 1.5}, {}, "whole number"),
        ({"gpu": 2}, {"tensor_parallel_size": "2"}, "tensor_parallel_size must be a whole"),
    ],
)
def test_gpus_that_cannot_hold_the_workers_are_a_config_error(
    resources: dict[str, Any], engine_args: dict[str, Any], message: str
) -> None:
    model = {"name": "m", "source": "org/m", "resources": resources, "engine_args": engine_args}
    with pytest.raises(ConfigError, match=message):
        load_config({"models": [model]})


def test_the_rendered_engine_pod_holds_the_placement_group(tmp_path: Path) -> None:
    """KubeRay advertises the pod's limits as the node's Ray resources: a tensor-parallel
    replica's placement group must fit in its engine pod, one pod per replica."""
    serve_config = imported(VALUES_25_TP2)
    path = tmp_path / "tp2.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    spec = the_model(serve_config)
    docs = [d for d in yaml.safe_load_all(render_file(path)) if d]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = [
        container["resources"]["limits"]
        for group in groups
        for container in group["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in container["resources"]["limits"]
    ]
    assert len(limits) == 1
    (pod,) = limits
    advertised = {
        "CPU": float(parse_quantity(str(pod["cpu"]))),
        "GPU": float(pod["nvidia.com/gpu"]),
        "memory": float(parse_quantity(str(pod["memory"]))),
    }
    bundles = placement_bundles(spec)
    assert advertised["GPU"] == math.ceil(spec.resources.gpu) == len(bundles)
    assert fits(total(bundles), advertised)


@pytest.mark.e2e
def test_ray_serve_llm_adds_the_replica_actor_to_the_first_bundle(cluster) -> None:
    """What Serve finally reserves (`get_deployment_options` merges the replica actor, which
    takes no CPU, into bundle 0) still passes vLLM's check and asks for the same in all."""
    from app.engines.llm_server import EngineServer

    spec = the_model(imported(VALUES_25_TP2, pipelineParallelSize=2))
    options = EngineServer.get_deployment_options(llm_config(spec, source="unused/for-options"))
    final = options["placement_group_bundles"]
    vllm_bundle_check(final, parallel(tensor=2, pipeline=2))
    assert total(final) == total(placement_bundles(spec))
    assert options["placement_group_strategy"] == "PACK"
