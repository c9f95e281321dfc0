"""`vrstack import-values`: a production-stack Helm values file -> our serve config (+ RayService).

Carried: servingEngineSpec.modelSpec[] (name, modelURL, replicaCount, requestCPU/Memory/GPU,
pvcStorage, vllmConfig, lmcacheConfig, hf_token as a Secret reference, enableLoRA) and
routerSpec (routingLogic, sessionKey, prefixMinMatchLength, replicaCount) where our config has a
place for them. Every other field set in the file gives a warning naming it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, get_args

import yaml

from app.config import RouterSettings, load_config
from app.config.stack import NOT_WIRED
from app.serve_config import BUILDER

# vllmConfig key -> vLLM engine argument (besides maxModelLen/dtype, which have fields)
VLLM_ARGS = {
    "tensorParallelSize": "tensor_parallel_size",
    "pipelineParallelSize": "pipeline_parallel_size",
    "enablePrefixCaching": "enable_prefix_caching",
    "enableChunkedPrefill": "enable_chunked_prefill",
    "gpuMemoryUtilization": "gpu_memory_utilization",
    "maxNumSeqs": "max_num_seqs",
    "maxLoras": "max_loras",
}
DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "float16": "float16",
          "half": "float16", "bfloat16": "bfloat16"}  # fmt: skip
# production-stack routingLogic -> the policy name our router may know
ROUTING = {"roundrobin": "round_robin", "session": "session", "prefixaware": "prefix",
           "kvaware": "kv", "disaggregated_prefill": "disaggregated_prefill"}  # fmt: skip
MODEL_FIELDS = {"name", "modelURL", "replicaCount", "requestCPU", "requestMemory", "requestGPU",
                "pvcStorage", "vllmConfig", "lmcacheConfig", "hf_token", "enableLoRA"}  # fmt: skip


@dataclass
class Imported:
    """The result: a serve config (dict), Secret reference for the token, and warnings."""

    serve_config: dict[str, Any]
    hf_token_secret: tuple[str, str] | None = None
    warnings: list[str] = field(default_factory=list)


def _set(value: Any) -> bool:
    return value not in (None, "", [], {}, False)


def _leaf_warnings(node: Any, path: str, reason: str) -> list[str]:
    if isinstance(node, dict):
        return [w for k, v in node.items() for w in _leaf_warnings(v, f"{path}.{k}", reason)]
    return [f"{path}: {reason} (value {node!r})"] if _set(node) else []


def parse_extra_args(args: list[str] | str, where: str) -> tuple[dict[str, Any], list[str]]:
    """vLLM CLI flags ('--max-num-batched-tokens 2048', '--flag') -> engine arguments."""
    tokens = (
        shlex.split(args)
        if isinstance(args, str)
        else [t for a in args for t in shlex.split(str(a))]
    )
    out: dict[str, Any] = {}
    warnings = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--"):
            warnings.append(f"{where}: {token!r} is not a --flag; not carried")
            continue
        key, _, value = token[2:].partition("=")
        if not value and index < len(tokens) and not tokens[index].startswith("--"):
            value, index = tokens[index], index + 1
        key = key.replace("-", "_")
        if key.startswith("no_") and not value:
            out[key[3:]] = False
            continue
        out[key] = yaml.safe_load(value) if value else True
    return out, warnings


LMCACHE_DISK_PATH = "/home/ray/.cache/huggingface/lmcache"  # in the model cache volume


def _lmcache(config: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """lmcacheConfig -> (our `kv_offload`, warnings): LMCache CPU/disk/remote KV offload."""
    if not config.get("enabled"):
        return None, _leaf_warnings(config, where, "LMCache is not enabled; ignored")
    offload: dict[str, Any] = {"backend": "lmcache"}
    warnings = []
    for key, value in config.items():
        if key == "enabled":
            continue
        if key == "cpuOffloadingBufferSize":
            offload["cpu_gb"] = _plain(float(value))
        elif key == "diskOffloadingBufferSize":
            offload["disk_gb"] = _plain(float(value))
            offload["disk_path"] = LMCACHE_DISK_PATH
        elif key == "remoteUrl" and _set(value):
            offload["remote_url"] = str(value)
        else:
            warnings += _leaf_warnings(value, f"{where}.{key}", "no LMCache setting for it here")
    return offload, warnings


def _model(spec: dict[str, Any], where: str, imported: Imported) -> dict[str, Any]:
    warn = imported.warnings
    url = spec.get("modelURL") or spec.get("name")
    model: dict[str, Any] = {"name": url, "source": url}
    if spec.get("name") and spec["name"] != url:
        model["aliases"] = [spec["name"]]
    engine_args: dict[str, Any] = {}
    env: dict[str, str] = {}
    for key, value in (spec.get("vllmConfig") or {}).items():
        here = f"{where}.vllmConfig.{key}"
        if key == "maxModelLen":
            model["max_model_len"] = int(value)
        elif key == "dtype":
            if str(value) in DTYPES:
                model["dtype"] = DTYPES[str(value)]
            else:
                warn.append(f"{here}: dtype {value!r} is not one of {sorted(DTYPES)}; not carried")
        elif key in VLLM_ARGS:
            engine_args[VLLM_ARGS[key]] = value
        elif key == "extraArgs":
            extra, problems = parse_extra_args(value, here)
            engine_args.update(extra)
            warn += problems
        elif key == "v1":
            env["VLLM_USE_V1"] = "1" if value else "0"
        else:
            warn += _leaf_warnings(value, here, "unknown vllmConfig field; not carried")
    kv_offload, lm_warnings = _lmcache(spec.get("lmcacheConfig") or {}, f"{where}.lmcacheConfig")
    if kv_offload is not None:
        model["kv_offload"] = kv_offload
    warn += lm_warnings
    if spec.get("enableLoRA"):
        engine_args["enable_lora"] = True
        warn.append(
            f"{where}.enableLoRA: carried as engine_args.enable_lora; loading adapters at run "
            "time (production-stack's LoRA controller) is not carried"
        )
    token = spec.get("hf_token")
    if isinstance(token, dict) and token.get("secretName"):
        imported.hf_token_secret = (token["secretName"], token.get("secretKey", "token"))
    elif _set(token):
        warn.append(
            f"{where}.hf_token: the token is not written to the manifests; they read Secret "
            "'hf-token' key 'token': "
            "kubectl create secret generic hf-token --from-literal=token=..."
        )
    resources: dict[str, Any] = {}
    if "requestCPU" in spec:
        resources["cpu"] = float(spec["requestCPU"])
    if "requestGPU" in spec:
        resources["gpu"] = float(spec["requestGPU"])
    if spec.get("requestMemory"):
        resources["memory"] = str(spec["requestMemory"])
    if spec.get("pvcStorage"):
        resources["storage"] = str(spec["pvcStorage"])
    tp = int(engine_args.get("tensor_parallel_size", 1)) * int(
        engine_args.get("pipeline_parallel_size", 1)
    )
    if resources.get("gpu", 0) and tp > resources["gpu"]:
        warn.append(f"{where}: requestGPU {resources['gpu']:g} < parallel size {tp}; using {tp}")
        resources["gpu"] = float(tp)
    for key in ("replicaCount",):
        if key in spec:
            model["replicas"] = int(spec[key])
    if engine_args:
        model["engine_args"] = engine_args
    if env:
        model["env"] = env
    if resources:
        model["resources"] = {k: _plain(v) for k, v in resources.items()}
    for key, value in spec.items():
        if key not in MODEL_FIELDS and key != "replicaCount":
            warn += _leaf_warnings(
                value, f"{where}.{key}", "not carried (Ray images and scheduling)"
            )
    return model


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _router(spec: dict[str, Any], imported: Imported) -> tuple[dict[str, Any], dict[str, Any]]:
    """routerSpec -> (router settings, server settings), warning for what has no place."""
    policies = get_args(RouterSettings.model_fields["policy"].annotation)
    router_fields = set(RouterSettings.model_fields)
    router: dict[str, Any] = {}
    server: dict[str, Any] = {}
    for key, value in spec.items():
        where = f"routerSpec.{key}"
        if key == "routingLogic":
            policy = ROUTING.get(str(value), str(value))
            if policy in NOT_WIRED:
                imported.warnings.append(
                    f"{where}: {value!r} -> policy {policy!r} {NOT_WIRED[policy]}; "
                    f"using {RouterSettings().policy}"
                )
            elif policy in policies:
                router["policy"] = policy
            else:
                imported.warnings.append(
                    f"{where}: {value!r} has no policy here (known: {', '.join(policies)}); "
                    f"using {RouterSettings().policy}"
                )
        elif key in ("sessionKey", "prefixMinMatchLength"):
            target = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
            if target in router_fields:
                router[target] = value
            else:
                imported.warnings.append(f"{where}: no router setting for it; not carried")
        elif key == "replicaCount":
            server["ingress_replicas"] = int(value)
        else:
            imported.warnings += _leaf_warnings(value, where, "not carried")
    return router, server


def import_values(values: dict[str, Any], *, app_name: str = "vrstack") -> Imported:
    """Convert parsed values; the serve config is validated (ConfigError if it cannot run)."""
    imported = Imported(serve_config={})
    engine_spec = values.get("servingEngineSpec") or {}
    models = [
        _model(spec, f"servingEngineSpec.modelSpec[{i}]", imported)
        for i, spec in enumerate(engine_spec.get("modelSpec") or [])
    ]
    for key, value in engine_spec.items():
        if key not in ("modelSpec", "enableEngine"):
            imported.warnings += _leaf_warnings(
                value, f"servingEngineSpec.{key}", "not carried (Ray images and scheduling)"
            )
    router, server = _router(values.get("routerSpec") or {}, imported)
    for key, value in values.items():
        if key not in ("servingEngineSpec", "routerSpec"):
            imported.warnings += _leaf_warnings(value, key, "not carried")
    args: dict[str, Any] = {"models": models}
    if router:
        args["router"] = router
    if server:
        args["server"] = server
    load_config(args)  # raises ConfigError naming each bad field
    imported.serve_config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {"name": app_name, "route_prefix": "/", "import_path": BUILDER, "args": args}
        ],
    }
    return imported


def dump_serve_config(imported: Imported, source: str) -> str:
    header = f"# Imported by `vrstack import-values {source}` from production-stack Helm values.\n"
    return header + yaml.safe_dump(imported.serve_config, sort_keys=False, width=1000)
