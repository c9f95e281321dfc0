"""What each serve config asks Ray for, computed by Ray Serve LLM itself (needs a Ray cluster)."""

from __future__ import annotations

import pytest

from app.engines.llm_config import deployment_name, llm_config
from app.engines.llm_server import EngineServer
from app.serve_config import read_serve_config
from tests.conftest import SERVE_CONFIGS

pytestmark = pytest.mark.e2e


def _options(config_file: str, index: int = 0) -> tuple[dict, object]:
    spec = read_serve_config(SERVE_CONFIGS / config_file).apps[0].config.models[index]
    config = llm_config(spec, source="unused/for-options")
    return EngineServer.get_deployment_options(config), config


def test_opt125m_asks_for_one_gpu_six_cpus_16gi(cluster):
    options, config = _options("opt125m.yaml")
    assert options["num_replicas"] == 1
    assert options["placement_group_bundles"] == [{"CPU": 6.0, "GPU": 1.0, "memory": 16 * 2**30}]
    assert config.model_id == "facebook/opt-125m"


def test_cpu_engine_bundle_has_no_gpu(cluster):
    options, config = _options("smollm2-cpu.yaml")
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 0}]
    assert options["ray_actor_options"]["runtime_env"]["env_vars"] == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # its one thread placed by the OS
        "OMP_NUM_THREADS": "1",
    }
    assert config.engine_kwargs == {
        "dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
        "enable_prompt_tokens_details": True,  # answers tell their cached tokens
    }  # fmt: skip


def test_autoscaling_reaches_serve_options(cluster, cpu_model):
    from app.config import ModelSpec

    spec = ModelSpec.model_validate(
        {**cpu_model, "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    )
    options = EngineServer.get_deployment_options(llm_config(spec, source="x/y"))
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16,
        "policy": {"policy_function": "app.engines.autoscaling:relay_aware_policy"},
    }  # fmt: skip
    assert deployment_name(spec) == "engine:smollm2"
