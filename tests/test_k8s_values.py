"""`vrstack import-values`: production-stack Helm values -> our serve config and RayService."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.k8s.validate import file_errors
from app.k8s.values import import_values, parse_extra_args
from app.serve_config import read_serve_config
from tests.conftest import SERVE_CONFIGS
from tests.test_k8s_render import CRDS

MINIMAL = """
servingEngineSpec:
  runtimeClassName: ""
  modelSpec:
  - name: "opt125m"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "facebook/opt-125m"
    replicaCount: 1
    requestCPU: 6
    requestMemory: "16Gi"
    requestGPU: 1
    pvcStorage: "10Gi"
"""

TWO_MODELS_LMCACHE = """
servingEngineSpec:
  runtimeClassName: "nvidia"
  modelSpec:
  - name: "llama3"
    repository: "lmcache/vllm-openai"
    tag: "latest"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    replicaCount: 2
    requestCPU: 10
    requestMemory: "40Gi"
    requestGPU: 1
    pvcStorage: "50Gi"
    vllmConfig:
      enablePrefixCaching: true
      maxModelLen: 16384
      dtype: "bfloat16"
      gpuMemoryUtilization: 0.9
      maxNumSeqs: 64
      extraArgs: ["--disable-log-requests", "--max-num-batched-tokens", "2048"]
    lmcacheConfig:
      enabled: true
      cpuOffloadingBufferSize: "20"
    hf_token: <your-hf-token>
  - name: "mistral"
    repository: "lmcache/vllm-openai"
    tag: "latest"
    modelURL: "mistralai/Mistral-7B-Instruct-v0.2"
    replicaCount: 1
    requestCPU: 10
    requestMemory: "40Gi"
    requestGPU: 2
    pvcStorage: "50Gi"
    enableLoRA: true
    vllmConfig:
      tensorParallelSize: 2
      maxModelLen: 4096
    lmcacheConfig:
      enabled: true
      cpuOffloadingBufferSize: "10"
      enableController: true
    hf_token:
      secretName: my-hf-secret
      secretKey: hf_token
routerSpec:
  replicaCount: 2
  routingLogic: "session"
  sessionKey: "x-user-id"
  prefixMinMatchLength: 8
"""


def test_minimal_values_give_the_opt125m_serve_config():
    imported = import_values(yaml.safe_load(MINIMAL))
    ours = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw["applications"][0]["args"]
    assert imported.serve_config["applications"][0]["args"] == ours
    assert sorted(w.split(":")[0] for w in imported.warnings) == [
        "servingEngineSpec.modelSpec[0].repository",
        "servingEngineSpec.modelSpec[0].tag",
    ]


def test_two_models_with_lmcache():
    imported = import_values(yaml.safe_load(TWO_MODELS_LMCACHE))
    args = imported.serve_config["applications"][0]["args"]
    llama, mistral = args["models"]
    assert llama["name"] == "meta-llama/Llama-3.1-8B-Instruct" and llama["aliases"] == ["llama3"]
    assert (llama["max_model_len"], llama["dtype"], llama["replicas"]) == (16384, "bfloat16", 2)
    assert llama["engine_args"] == {
        "enable_prefix_caching": True,
        "gpu_memory_utilization": 0.9,
        "max_num_seqs": 64,
        "disable_log_requests": True,
        "max_num_batched_tokens": 2048,
    }
    assert llama["kv_offload"] == {"backend": "lmcache", "cpu_gb": 20}
    assert "env" not in llama
    assert llama["resources"] == {"cpu": 10, "gpu": 1, "memory": "40Gi", "storage": "50Gi"}
    assert mistral["engine_args"]["tensor_parallel_size"] == 2
    assert mistral["engine_args"]["enable_lora"] is True
    assert mistral["resources"]["gpu"] == 2
    assert args["server"] == {"ingress_replicas": 2}
    assert args["router"] == {"policy": "session", "session_key": "x-user-id"}
    assert imported.hf_token_secret == ("my-hf-secret", "hf_token")
    text = "\n".join(imported.warnings)
    for field in (
        "runtimeClassName",
        "modelSpec[0].repository",
        "modelSpec[0].hf_token",
        "lmcacheConfig.enableController",
        "enableLoRA",
        "prefixMinMatchLength",
    ):
        assert field in text, field
    assert "<your-hf-token>" not in yaml.safe_dump(imported.serve_config)


def test_extra_args_forms():
    parsed, warnings = parse_extra_args(["--a-b=3", "--flag", "--no-c", "--d x", "stray"], "w")
    assert parsed == {"a_b": 3, "flag": True, "c": False, "d": "x"}
    assert warnings == ["w: 'stray' is not a --flag; not carried"]


def test_import_values_command_writes_valid_config_and_rayservice(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(TWO_MODELS_LMCACHE)
    serve, manifest = tmp_path / "two.yaml", tmp_path / "two-k8s.yaml"
    result = CliRunner().invoke(
        cli, ["import-values", str(values), "-o", str(serve), "--k8s-output", str(manifest)]
    )
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "prefixMinMatchLength" in result.output
    assert len(read_serve_config(serve).apps[0].config.models) == 2
    assert file_errors(manifest, CRDS if CRDS.is_dir() else None) == []
    docs = {d["kind"]: d for d in yaml.safe_load_all(manifest.read_text()) if d}
    assert docs["RayService"]["metadata"]["name"] == "vllm"
    engine = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]  # engines
    env = engine["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
    assert (token["name"], token["key"]) == ("my-hf-secret", "hf_token")


def test_import_values_to_stdout_and_bad_values(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(MINIMAL)
    result = CliRunner().invoke(cli, ["import-values", str(values)])
    assert result.exit_code == 0 and "facebook/opt-125m" in result.output
    values.write_text(MINIMAL.replace("requestCPU: 6", "requestCPU: -2"))
    result = CliRunner().invoke(cli, ["import-values", str(values)])
    assert result.exit_code == 2 and "resources.cpu" in result.output


def test_kvaware_routing_imports_as_the_default_policy_with_a_warning():
    values = {"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "org/m"}]},
              "routerSpec": {"routingLogic": "kvaware"}}  # fmt: skip
    imported = import_values(values)
    assert imported.serve_config["applications"][0]["args"].get("router", {}).get("policy") in (
        None,
        "scored",
    )
    assert any("'kvaware'" in w and "KV cache events" in w for w in imported.warnings)
