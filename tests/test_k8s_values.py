"""`vrstack import-values`: production-stack Helm values -> our serve config and RayService."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.config import ConfigError, load_config
from app.k8s.options import RenderOptions
from app.k8s.render import dump_documents, render_documents
from app.k8s.validate import file_errors
from app.k8s.values import dump_serve_config, import_values, parse_extra_args
from app.serve_config import BUILDER, read_serve_config
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
    assert mistral["secret_env"] == {"HF_TOKEN": {"name": "my-hf-secret", "key": "hf_token"}}
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
    groups = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    engine = next(g for g in groups if "mistral" in g["groupName"])  # llama's is its own
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


def test_kvaware_routing_imports_as_the_kv_policy():
    values = {"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "org/m"}]},
              "routerSpec": {"routingLogic": "kvaware"}}  # fmt: skip
    imported = import_values(values)
    assert imported.serve_config["applications"][0]["args"]["router"]["policy"] == "kv"
    assert not any("kvaware" in w for w in imported.warnings)


# Fixtures modelled on production-stack's tutorial values files (tutorials/assets/ in
# vllm-project/production-stack); each names the file it mirrors.

# helm/values.yaml's example entry (`enabled: false`: "not deployed by default") next to
# values-04-multiple-models.yaml's llama3 entry.
DISABLED_MODEL = """
servingEngineSpec:
  modelSpec:
  - name: "llama3"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    requestCPU: 10
    requestMemory: "16Gi"
    requestGPU: 1
  - name: "mistral"
    enabled: false
    repository: "lmcache/vllm-openai"
    tag: "latest"
    modelURL: "mistralai/Mistral-7B-Instruct-v0.2"
    requestCPU: 6
    requestGPU: 1
"""

# values-04-multiple-models.yaml: two models, each with its own hf_token (one a literal as
# there, one a Secret reference, the chart's other form).
PER_MODEL_TOKENS = """
servingEngineSpec:
  modelSpec:
  - name: "llama3"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    requestCPU: 10
    requestMemory: "16Gi"
    requestGPU: 1
    vllmConfig:
      maxModelLen: 4096
      maxNumSeqs: 32
      maxLoras: 4
      gpuMemoryUtilization: 0.8
    hf_token: <YOUR HF TOKEN FOR LLAMA3.1>
  - name: "mistral"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "mistralai/Mistral-7B-Instruct-v0.2"
    requestCPU: 10
    requestMemory: "16Gi"
    requestGPU: 1
    vllmConfig:
      maxModelLen: 4096
      gpuMemoryUtilization: 0.95
    hf_token:
      secretName: mistral-token
      secretKey: token
"""

# values-14-vllm-v1.yaml (prefix caching on), values-04 (a vllmConfig without it) and
# values-01-minimal-example.yaml (no vllmConfig at all).
PREFIX_CACHING = """
servingEngineSpec:
  modelSpec:
  - name: "llama3"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    requestGPU: 1
    vllmConfig:
      enablePrefixCaching: true
      maxModelLen: 4096
      extraArgs: ["--gpu-memory-utilization", "0.8"]
  - name: "mistral"
    modelURL: "mistralai/Mistral-7B-Instruct-v0.2"
    requestGPU: 1
    vllmConfig:
      maxModelLen: 4096
  - name: "opt125m"
    modelURL: "facebook/opt-125m"
    requestGPU: 1
"""

# values-16-disagg-prefill.yaml's prefill engine (cpuOffloadingBufferSize: 0), given the GPU
# that file leaves commented out.
CPU_OFFLOAD_OFF = """
servingEngineSpec:
  modelSpec:
  - name: "llama-prefill"
    repository: "lmcache/vllm-openai"
    tag: "2025-05-27-v1"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    requestCPU: 8
    requestMemory: "30Gi"
    requestGPU: 1
    vllmConfig:
      enablePrefixCaching: true
      maxModelLen: 32000
    lmcacheConfig:
      enabled: true
      cpuOffloadingBufferSize: 0
"""

# values-11-secure-vllm.yaml (a literal vllmApiKey).
SECURE = """
servingEngineSpec:
  runtimeClassName: ""
  vllmApiKey: "abc123XYZ987"
  modelSpec:
  - name: "opt125m"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "facebook/opt-125m"
    replicaCount: 1
    requestCPU: 6
    requestMemory: "16Gi"
    requestGPU: 1
"""

# values-13-tool-enabled.yaml: tool calling, a chat template and the token in `env`, plus
# helm/values.yaml's modelRevision and vllmConfig.runner/convert.
TOOLS = """
servingEngineSpec:
  runtimeClassName: ""
  modelSpec:
  - name: "llama3-8b"
    repository: "vllm/vllm-openai"
    tag: "latest"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    modelRevision: "0e9e39f249a16976918f6564b8830bc894c89659"
    enableTool: true
    toolCallParser: "llama3_json"
    chatTemplate: "tool_chat_template_llama3.1_json.jinja"
    chatTemplateConfigMap: |-
      {{- bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}
    env:
      - name: HUGGING_FACE_HUB_TOKEN
        valueFrom:
          secretKeyRef:
            name: huggingface-credentials
            key: HUGGING_FACE_HUB_TOKEN
      - name: VLLM_TEMPLATE_DIR
        value: "/templates"
    replicaCount: 1
    requestCPU: 8
    requestMemory: "32Gi"
    requestGPU: 1
    vllmConfig:
      maxModelLen: 4096
      dtype: "bfloat16"
      tensorParallelSize: 1
      runner: "generate"
"""

# values-17-kv-aware.yaml: gpuMemoryUtilization as a string and an `env` with HF_HOME.
STRING_NUMBERS = """
servingEngineSpec:
  runtimeClassName: ""
  modelSpec:
  - name: "gpt-oss-20b"
    repository: "lmcache/vllm-openai"
    tag: "v0.3.9post2"
    modelURL: "openai/gpt-oss-20b"
    replicaCount: 2
    requestCPU: 8
    requestMemory: "128Gi"
    requestGPU: 1
    pvcStorage: "256Gi"
    vllmConfig:
      enablePrefixCaching: true
      maxModelLen: 8000
      gpuMemoryUtilization: "0.9"
    lmcacheConfig:
      enabled: true
      cpuOffloadingBufferSize: "60"
    env:
      - name: VLLM_LOGGING_LEVEL
        value: "DEBUG"
      - name: HF_HOME
        value: "/data"
"""

FIXTURES = {
    "disabled-model": DISABLED_MODEL,
    "per-model-tokens": PER_MODEL_TOKENS,
    "prefix-caching": PREFIX_CACHING,
    "cpu-offload-off": CPU_OFFLOAD_OFF,
    "secure": SECURE,
    "tools": TOOLS,
    "string-numbers": STRING_NUMBERS,
    "two-models-lmcache": TWO_MODELS_LMCACHE,
    "minimal": MINIMAL,
}


def _models(text: str) -> tuple[list[dict], list[str]]:
    imported = import_values(yaml.safe_load(text))
    return imported.serve_config["applications"][0]["args"]["models"], imported.warnings


def _manifest(text: str, tmp_path) -> dict:
    """Import `text` with the CLI and return its RayService's pods' env by group name."""
    values, serve, manifest = (tmp_path / n for n in ("v.yaml", "s.yaml", "k.yaml"))
    values.write_text(text)
    result = CliRunner().invoke(
        cli, ["import-values", str(values), "-o", str(serve), "--k8s-output", str(manifest)]
    )
    assert result.exit_code == 0, result.output
    docs = {d["kind"]: d for d in yaml.safe_load_all(manifest.read_text()) if d}
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    envs = {
        name: group["template"]["spec"]["containers"][0]["env"] for name, group in groups.items()
    }
    for name, env in envs.items():  # one entry per variable, or the pod's value is ambiguous
        assert len({e["name"] for e in env}) == len(env), name
    return {name: {e["name"]: e for e in env} for name, env in envs.items()}


def _secret(entry: dict) -> tuple[str, str]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("name", FIXTURES)
def test_each_fixture_imports_to_a_valid_serve_config_and_manifest(name, tmp_path):
    imported = import_values(yaml.safe_load(FIXTURES[name]))
    serve = tmp_path / "serve.yaml"
    serve.write_text(dump_serve_config(imported, "values.yaml"))
    loaded = read_serve_config(serve)  # our own config validation
    assert loaded.apps[0].config.models
    manifest = tmp_path / "k8s.yaml"
    manifest.write_text(dump_documents(render_documents(loaded, RenderOptions(name="vllm")), "x"))
    assert file_errors(manifest, CRDS if CRDS.is_dir() else None) == []


def test_disabled_models_are_skipped_and_said_so():
    models, warnings = _models(DISABLED_MODEL)
    assert [m["name"] for m in models] == ["meta-llama/Llama-3.1-8B-Instruct"]
    assert any(w.startswith("servingEngineSpec.modelSpec[1]") and "enabled: false" in w
               for w in warnings)  # fmt: skip
    values = yaml.safe_load(DISABLED_MODEL)
    values["servingEngineSpec"]["modelSpec"][0]["enabled"] = False
    with pytest.raises(ConfigError, match="no enabled model"):
        import_values(values)


def test_no_engines_means_nothing_to_import():
    values = yaml.safe_load(MINIMAL)
    values["servingEngineSpec"]["enableEngine"] = False
    with pytest.raises(ConfigError, match="enableEngine is false"):
        import_values(values)


def test_each_model_keeps_its_own_hf_token_secret(tmp_path):
    llama, mistral = _models(PER_MODEL_TOKENS)[0]
    assert mistral["secret_env"] == {"HF_TOKEN": {"name": "mistral-token", "key": "token"}}
    assert llama["secret_env"]["HF_TOKEN"] != mistral["secret_env"]["HF_TOKEN"]
    assert "<YOUR HF TOKEN" not in yaml.safe_dump([llama, mistral])
    envs = _manifest(PER_MODEL_TOKENS, tmp_path)
    tokens = {name: _secret(env["HF_TOKEN"]) for name, env in envs.items() if "HF_TOKEN" in env}
    llama_secret = (llama["secret_env"]["HF_TOKEN"]["name"], llama["secret_env"]["HF_TOKEN"]["key"])
    assert sorted(tokens.values()) == sorted([llama_secret, ("mistral-token", "token")])
    warnings = _models(PER_MODEL_TOKENS)[1]
    command = next(w for w in warnings if "kubectl create secret" in w)
    assert f"--from-literal={llama_secret[1]}=" in command and llama_secret[0] in command


def test_prefix_caching_is_off_unless_the_vllm_config_enables_it():
    llama, mistral, opt = _models(PREFIX_CACHING)[0]
    assert llama["engine_args"]["enable_prefix_caching"] is True
    assert mistral["engine_args"]["enable_prefix_caching"] is False  # chart: --no-enable-...
    assert "enable_prefix_caching" not in opt.get("engine_args", {})  # no vllmConfig: vLLM's
    values = yaml.safe_load(PREFIX_CACHING)
    values["servingEngineSpec"]["modelSpec"][1]["vllmConfig"]["extraArgs"] = [
        "--enable-prefix-caching"
    ]
    assert (
        import_values(values).serve_config["applications"][0]["args"]["models"][1]["engine_args"][
            "enable_prefix_caching"
        ]
        is True
    )  # extraArgs come later on the chart's command line


def test_zero_cpu_offloading_buffer_turns_that_tier_off():
    (model,), warnings = _models(CPU_OFFLOAD_OFF)
    assert "kv_offload" not in model
    assert any("lmcacheConfig" in w and "not imported" in w for w in warnings)
    values = yaml.safe_load(CPU_OFFLOAD_OFF)
    values["servingEngineSpec"]["modelSpec"][0]["lmcacheConfig"]["diskOffloadingBufferSize"] = 10
    (model,) = import_values(values).serve_config["applications"][0]["args"]["models"]
    assert model["kv_offload"]["disk_gb"] == 10 and "cpu_gb" not in model["kv_offload"]


def test_a_literal_api_key_turns_auth_on():
    from app.config import load_config
    from app.ingress.auth import KeyStore

    args = import_values(yaml.safe_load(SECURE)).serve_config["applications"][0]["args"]
    keys = KeyStore.from_settings(load_config(args).auth)
    assert keys.enabled and keys.identify("abc123XYZ987") is not None


def test_an_api_key_secret_reaches_the_ingress_pods(tmp_path):
    text = SECURE.replace(
        'vllmApiKey: "abc123XYZ987"', "vllmApiKey:\n    secretName: api\n    secretKey: key"
    )
    args = import_values(yaml.safe_load(text)).serve_config["applications"][0]["args"]
    assert args["auth"] == {"api_keys_secret": {"name": "api", "key": "key"}}
    variable = load_config(args).auth.api_keys_env  # what the ingress reads
    assert _secret(_manifest(text, tmp_path)["ingress"][variable]) == ("api", "key")


def test_env_values_and_secrets_are_carried(tmp_path):
    (model,), warnings = _models(TOOLS)
    assert model["env"] == {"VLLM_TEMPLATE_DIR": "/templates"}
    assert model["secret_env"] == {
        "HUGGING_FACE_HUB_TOKEN": {
            "name": "huggingface-credentials",
            "key": "HUGGING_FACE_HUB_TOKEN",
        }
    }
    engines = [env for name, env in _manifest(TOOLS, tmp_path).items() if name.startswith("gpu")]
    assert [_secret(env["HUGGING_FACE_HUB_TOKEN"]) for env in engines] == [
        ("huggingface-credentials", "HUGGING_FACE_HUB_TOKEN")
    ]
    (model,), warnings = _models(STRING_NUMBERS)
    assert model["env"] == {"VLLM_LOGGING_LEVEL": "DEBUG"}  # HF_HOME is the model cache's
    assert any("env[1]" in w and "HF_HOME" in w for w in warnings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.9", 0.9),
        (0.5, 0.5),
        ("1.5", "less than or equal to 1"),
        ("lots", "valid number"),
    ],
)
def test_gpu_memory_utilization_is_a_number_in_range(value, expected):
    values = yaml.safe_load(STRING_NUMBERS)
    values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["gpuMemoryUtilization"] = value
    if isinstance(expected, float):
        (model,) = import_values(values).serve_config["applications"][0]["args"]["models"]
        assert model["engine_args"]["gpu_memory_utilization"] == expected
        return
    with pytest.raises(ConfigError, match=expected) as info:
        import_values(values)
    assert "modelSpec[0].vllmConfig.gpuMemoryUtilization" in str(info.value)


def test_tool_calling_template_revision_and_runner_become_vllm_arguments():
    (model,), warnings = _models(TOOLS)
    args = model["engine_args"]
    spec = yaml.safe_load(TOOLS)["servingEngineSpec"]["modelSpec"][0]
    assert args["enable_auto_tool_choice"] is True
    assert args["tool_call_parser"] == spec["toolCallParser"]
    assert args["chat_template"] == spec["chatTemplateConfigMap"]
    assert args["revision"] == spec["modelRevision"]
    assert args["runner"] == spec["vllmConfig"]["runner"]
    carried = ("enableTool", "toolCallParser", "chatTemplate", "modelRevision", "runner")
    assert not [w for w in warnings if any(f".{key}" in w for key in carried)]
    # vLLM takes them: Ray Serve LLM splits engine_args into vLLM's engine and server
    # arguments at engine start and refuses any name that is neither.
    pytest.importorskip("ray.serve.llm")
    from ray.llm._internal.serve.engines.vllm.vllm_models import VLLMEngineConfig

    from app.engines.llm_config import llm_config

    config = VLLMEngineConfig.from_llm_config(
        llm_config(load_config({"models": [model]}).models[0])
    )
    assert set(args) <= set(config.engine_kwargs) | set(config.frontend_kwargs)


def test_a_chat_template_file_is_the_charts_path_with_a_warning():
    values = yaml.safe_load(TOOLS)
    del values["servingEngineSpec"]["modelSpec"][0]["chatTemplateConfigMap"]
    imported = import_values(values)
    (model,) = imported.serve_config["applications"][0]["args"]["models"]
    assert model["engine_args"]["chat_template"] == (
        "/templates/tool_chat_template_llama3.1_json.jinja"
    )
    assert any("chatTemplate" in w and "/templates/" in w for w in imported.warnings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"secret_env": {"HF-TOKEN": {"name": "s", "key": "k"}}}, "not an environment variable"),
        ({"secret_env": {"HF_TOKEN": {"name": "Not_A_Name", "key": "k"}}}, "secret_env.HF_TOKEN"),
        ({"secret_env": {"A": {"name": "s", "key": "k"}}, "env": {"A": "1"}}, "both env and"),
    ],
)
def test_secret_env_is_checked(cpu_model, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"models": [{**cpu_model, **change}]})


def test_an_api_key_secret_needs_the_variable_it_is_read_through(cpu_model):
    auth = {"api_keys_secret": {"name": "api", "key": "key"}, "api_keys_env": None}
    with pytest.raises(ConfigError, match="set api_keys_env"):
        load_config({"models": [cpu_model], "auth": auth})


def test_applications_reading_one_variable_from_two_secrets_are_refused(cpu_model, tmp_path):
    apps = [
        {"name": f"a{i}", "route_prefix": f"/{i}", "import_path": BUILDER,
         "args": {"models": [{**cpu_model, "name": f"m{i}", "aliases": []}],
                  "auth": {"api_keys_secret": {"name": f"s{i}", "key": "k"}}}}
        for i in range(2)
    ]  # fmt: skip
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"applications": apps}))
    with pytest.raises(ValueError, match="VRSTACK_API_KEYS from different Secrets"):
        render_documents(read_serve_config(path), RenderOptions(name="two"))


LORA_VALUES = """
servingEngineSpec:
  modelSpec:
  - name: "llama3"
    modelURL: "meta-llama/Llama-3.1-8B-Instruct"
    requestGPU: 1
    enableLoRA: true
    vllmConfig:
      maxLoras: 2
      extraArgs: ["--max-lora-rank", "32"]
loraController:
  enableLoraController: true
loraAdapters:
- name: sql
  baseModel: llama3
  adapterSource:
    type: huggingface
    adapterName: llama-sql
    repository: org/llama-sql-lora
  loraAdapterDeploymentConfig:
    algorithm: default
    replicas: 1
- name: finance
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapterSource:
    type: s3
    adapterName: finance
    repository: my-bucket
    adapterPath: adapters/finance
    credentials: my-s3-secret
- name: local
  baseModel: llama3
  adapterSource:
    type: local
    adapterName: local-lora
    adapterPath: {local}
- name: web
  baseModel: llama3
  adapterSource:
    type: http
    adapterName: web-lora
- name: elsewhere
  baseModel: mistral
  adapterSource:
    type: huggingface
    adapterName: m-lora
    repository: org/m-lora
"""


def test_lora_adapters_become_their_base_models_lora_settings(tmp_path):
    local = tmp_path / "local-lora"
    local.mkdir()
    (local / "adapter_config.json").write_text('{"r": 16}')
    imported = import_values(yaml.safe_load(LORA_VALUES.format(local=local)))
    (model,) = imported.serve_config["applications"][0]["args"]["models"]
    assert model["lora"] == {
        "adapters": [
            {"name": "llama-sql", "source": "org/llama-sql-lora"},
            {"name": "finance", "source": "s3://my-bucket/adapters/finance"},
            {"name": "local-lora", "source": str(local)},
        ],
        "max_active": 2,
        "max_rank": 32,
        "max_adapters_per_replica": 4,
    }
    assert "enable_lora" not in model.get("engine_args", {})
    text = "\n".join(imported.warnings)
    for field in ("loraController", "loraAdapters[0].loraAdapterDeploymentConfig",
                  "loraAdapters[1].adapterSource.credentials", "loraAdapters[3].adapterSource",
                  "loraAdapters[4]: baseModel 'mistral'"):  # fmt: skip
        assert field in text, field
    manifest = tmp_path / "k8s.yaml"
    serve = tmp_path / "serve.yaml"
    serve.write_text(dump_serve_config(imported, "values.yaml"))
    loaded = read_serve_config(serve)
    manifest.write_text(dump_documents(render_documents(loaded, RenderOptions(name="vllm")), "x"))
    assert file_errors(manifest, CRDS if CRDS.is_dir() else None) == []


def test_a_local_adapter_not_on_this_machine_is_said_and_left_out():
    values = yaml.safe_load(LORA_VALUES.format(local="/nowhere/adapter"))
    imported = import_values(values)
    (model,) = imported.serve_config["applications"][0]["args"]["models"]
    assert "local-lora" not in [a["name"] for a in model["lora"]["adapters"]]
    assert any(
        "'/nowhere/adapter' holds no adapter on this machine" in w for w in imported.warnings
    )
