"""`kv_offload` in the model spec -> LMCache's connector in the engine arguments and `LMCACHE_*`
in the replica's runtime_env. LMCache is CUDA-only, so only the generated settings are tested."""

from __future__ import annotations

import pytest
import yaml

from app.config import ConfigError, load_config
from app.engines.llm_config import engine_env, engine_kwargs, llm_config
from app.k8s.values import import_values

GPU_MODEL = {
    "name": "llama",
    "source": "meta-llama/Llama-3.1-8B-Instruct",
    "resources": {"cpu": 4, "gpu": 1},
}
CONNECTOR = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}


def spec_with(offload: dict, **extra):
    return load_config({"models": [{**GPU_MODEL, "kv_offload": offload, **extra}]}).models[0]


def test_cpu_offload_gives_the_connector_and_lmcache_env():
    spec = spec_with({"backend": "lmcache", "cpu_gb": 20})
    assert engine_kwargs(spec)["kv_transfer_config"] == CONNECTOR
    assert engine_env(spec) == {
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "20",
    }


def test_disk_and_remote_offload():
    spec = spec_with(
        {
            "cpu_gb": 8.5,
            "disk_gb": 100,
            "disk_path": "/mnt/lmcache/",
            "remote_url": "lm://cache-server:65432",
            "chunk_size": 512,
        }
    )
    assert engine_env(spec) == {
        "LMCACHE_CHUNK_SIZE": "512",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "8.5",
        "LMCACHE_LOCAL_DISK": "file:///mnt/lmcache/",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "100",
        "LMCACHE_REMOTE_URL": "lm://cache-server:65432",
        "LMCACHE_REMOTE_SERDE": "naive",
    }


def test_defaults_and_user_env_wins():
    spec = spec_with({}, env={"LMCACHE_CHUNK_SIZE": "128", "HF_HUB_OFFLINE": "1"})
    env = engine_env(spec)
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "5"  # LMCache's default
    assert env["LMCACHE_CHUNK_SIZE"] == "128" and env["HF_HUB_OFFLINE"] == "1"


def test_llm_config_carries_engine_kwargs_and_runtime_env():
    pytest.importorskip("ray.serve.llm")
    config = llm_config(spec_with({"cpu_gb": 2}), source="/models/llama")
    assert config.engine_kwargs["kv_transfer_config"] == CONNECTOR
    assert config.runtime_env["env_vars"]["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "2"


def test_a_cpu_engine_runs_its_cpus_threads_unbound_unless_its_env_says_otherwise():
    cpu = {"name": "m", "source": "org/m", "resources": {"cpu": 2.5}}
    spec = load_config({"models": [cpu]}).models[0]
    assert engine_env(spec) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "2"}
    small = load_config({"models": [{**cpu, "resources": {"cpu": 0.5}}]}).models[0]
    assert engine_env(small)["OMP_NUM_THREADS"] == "1"
    bound = load_config({"models": [{**cpu, "env": {"VLLM_CPU_OMP_THREADS_BIND": "auto"}}]})
    assert engine_env(bound.models[0])["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_no_offload_changes_nothing():
    spec = load_config({"models": [GPU_MODEL]}).models[0]
    assert "kv_transfer_config" not in engine_kwargs(spec)
    assert engine_env(spec) == {}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {**GPU_MODEL, "resources": {"cpu": 1}, "kv_offload": {"cpu_gb": 1}},
            "kv_offload (LMCache) needs a GPU; set resources.gpu >= 1",
        ),
        (
            {**GPU_MODEL, "kv_offload": {"disk_gb": 10}},
            "disk_gb and disk_path go together",
        ),
        (
            {**GPU_MODEL, "kv_offload": {"backend": "mooncake"}},
            "kv_offload.backend: Input should be 'lmcache'",
        ),
        (
            {**GPU_MODEL, "kv_offload": {"cpu_gb": -1}},
            "kv_offload.cpu_gb: Input should be greater than 0",
        ),
        (
            {**GPU_MODEL, "kv_offload": {}, "engine_args": {"kv_transfer_config": {}}},
            "kv_transfer_config and kv_offload both set the KV connector",
        ),
    ],
)
def test_config_errors(model, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config({"models": [model]})
    assert message in str(info.value)


def test_production_stack_lmcache_config_maps_onto_kv_offload():
    values = yaml.safe_load(
        """
servingEngineSpec:
  modelSpec:
  - name: llama
    modelURL: meta-llama/Llama-3.1-8B-Instruct
    requestGPU: 1
    lmcacheConfig:
      enabled: true
      cpuOffloadingBufferSize: "20"
      diskOffloadingBufferSize: "60"
      remoteUrl: "lm://lmcache-server:81"
"""
    )
    (model,) = import_values(values).serve_config["applications"][0]["args"]["models"]
    assert model["kv_offload"] == {
        "backend": "lmcache",
        "cpu_gb": 20,
        "disk_gb": 60,
        "disk_path": "/home/ray/.cache/huggingface/lmcache",
        "remote_url": "lm://lmcache-server:81",
    }
    spec = load_config({"models": [model]}).models[0]
    assert engine_env(spec)["LMCACHE_LOCAL_DISK"] == "file:///home/ray/.cache/huggingface/lmcache/"


def test_lmcache_on_a_cpu_model_is_refused_by_import_values():
    values = {
        "servingEngineSpec": {
            "modelSpec": [
                {"name": "m", "modelURL": "facebook/opt-125m", "lmcacheConfig": {"enabled": True}}
            ]
        }
    }
    with pytest.raises(ConfigError, match="needs a GPU"):
        import_values(values)
