"""`vrstack import-values`: a production-stack Helm values file -> our serve config (+ RayService).

Read as production-stack's chart reads it (`helm/templates/deployment-vllm-multi.yaml`):
servingEngineSpec.modelSpec[] (models with `enabled: false` are skipped) with name, modelURL,
replicaCount, requestCPU/Memory/GPU, pvcStorage, vllmConfig (types checked; without
`enablePrefixCaching` prefix caching is off, as the chart passes --no-enable-prefix-caching),
lmcacheConfig, hf_token and env (values; Secret references per model), enableLoRA, enableTool,
toolCallParser, chatTemplate and modelRevision as vLLM arguments; servingEngineSpec.vllmApiKey
and env; routerSpec (routingLogic, sessionKey, replicaCount) where our config has a place for
them; loraAdapters[] (local, huggingface and s3 sources) as their base model's `lora`, with
its maxLoras. Every other field set in the file gives a warning naming it.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from app.config import ConfigError, RouterSettings, load_config
from app.serve_config import BUILDER

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Size = Annotated[float, Field(ge=0)]
# vllmConfig key -> (vLLM engine argument, its type) besides maxModelLen/dtype (fields of ours)
VLLM_ARGS: dict[str, tuple[str, Any]] = {
    "tensorParallelSize": ("tensor_parallel_size", PositiveInt),
    "pipelineParallelSize": ("pipeline_parallel_size", PositiveInt),
    "enablePrefixCaching": ("enable_prefix_caching", bool),
    "enableChunkedPrefill": ("enable_chunked_prefill", bool),
    "gpuMemoryUtilization": ("gpu_memory_utilization", Fraction),
    "maxNumSeqs": ("max_num_seqs", PositiveInt),
    "maxLoras": ("max_loras", PositiveInt),
    "runner": ("runner", str),
    "convert": ("convert", str),
}
# modelSpec key -> vLLM argument, put before vllmConfig's as on the chart's command line (vLLM's
# server arguments such as tool calling travel in engine_args too: Ray Serve LLM hands them to
# vLLM's frontend). modelRevision (--revision) and chatTemplate come after extraArgs.
MODEL_ARGS: dict[str, tuple[str, Any]] = {
    "enableLoRA": ("enable_lora", bool),
    "enableTool": ("enable_auto_tool_choice", bool),
    "toolCallParser": ("tool_call_parser", str),
}
CHAT_TEMPLATE_DIR = "/templates"  # where production-stack mounts its chat templates
DTYPES = {"auto": "auto", "float32": "float32", "float": "float32", "float16": "float16",
          "half": "float16", "bfloat16": "bfloat16"}  # fmt: skip
# production-stack routingLogic -> the policy name our router may know
ROUTING = {"roundrobin": "round_robin", "session": "session", "prefixaware": "prefix",
           "kvaware": "kv", "disaggregated_prefill": "disaggregated_prefill"}  # fmt: skip
MODEL_FIELDS = {"name", "enabled", "modelURL", "replicaCount", "requestCPU", "requestMemory",
                "requestGPU", "pvcStorage", "vllmConfig", "lmcacheConfig", "hf_token", "env",
                "modelRevision", "chatTemplate", "chatTemplateConfigMap", *MODEL_ARGS}  # fmt: skip
HF_TOKEN_SECRET = "hf-token"  # the Secret literal hf_tokens are read from (one key per model)
# Set by the manifests (the model cache volume); a value from the values file would move
# downloads off that volume.
MANAGED_ENV = {"HF_HOME"}


@dataclass
class Imported:
    """The result: a serve config (dict) and warnings."""

    serve_config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    # model name -> its key in Secret HF_TOKEN_SECRET (models given a literal hf_token)
    token_keys: dict[str, str] = field(default_factory=dict)


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind` (strings such as '0.9' become numbers), or a ConfigError naming it."""
    if kind is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string (got {value!r})")
        return str(value)
    try:
        return _adapter(kind).validate_python(value)
    except ValidationError as exc:
        message = exc.errors(include_url=False)[0]["msg"]
        raise ConfigError(f"{where}: {message} (got {value!r})") from None


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
    """lmcacheConfig -> (our `kv_offload`, warnings): LMCache CPU/disk/remote KV offload.
    A buffer size of 0 turns that tier off, as in production-stack's chart."""
    if not config.get("enabled"):
        return None, _leaf_warnings(config, where, "LMCache is not enabled; ignored")
    offload: dict[str, Any] = {"backend": "lmcache"}
    warnings = []
    for key, value in config.items():
        here = f"{where}.{key}"
        if key == "enabled":
            continue
        if key == "cpuOffloadingBufferSize":
            if size := coerce(value, Size, here):
                offload["cpu_gb"] = _plain(size)
        elif key == "diskOffloadingBufferSize":
            if size := coerce(value, Size, here):
                offload["disk_gb"] = _plain(size)
                offload["disk_path"] = LMCACHE_DISK_PATH
        elif key == "remoteUrl" and _set(value):
            offload["remote_url"] = str(value)
        else:
            warnings += _leaf_warnings(value, here, "no LMCache setting for it here")
    if "cpuOffloadingBufferSize" in config and len(offload) == 1:
        warnings.append(
            f"{where}: no CPU, disk or remote tier is on (cpuOffloadingBufferSize 0); "
            "LMCache KV offload is not imported"
        )
        return None, warnings
    return offload, warnings


def _secret_ref(ref: dict[str, Any]) -> dict[str, str]:
    return {"name": str(ref["name"]), "key": str(ref["key"])}


def _env(
    entries: Any, where: str, env: dict[str, str], secret_env: dict[str, dict[str, str]]
) -> list[str]:
    """Kubernetes `env` entries -> plain values (`env`) and Secret references (`secret_env`);
    a later entry wins over an earlier one of the same name, as in a pod."""
    if not isinstance(entries, list):
        return _leaf_warnings(entries, where, "expected a list of env entries; not carried")
    warnings = []
    for index, entry in enumerate(entries):
        here = f"{where}[{index}]"
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        source = (entry.get("valueFrom") or {}) if isinstance(entry, dict) else {}
        secret = source.get("secretKeyRef") if isinstance(source, dict) else None
        if name in MANAGED_ENV:
            warnings.append(
                f"{here}: {name} is set by the manifests (the model cache); not carried"
            )
        elif name and "value" in entry:
            secret_env.pop(name, None)
            env[name] = str(entry["value"])
        elif name and isinstance(secret, dict) and secret.get("name") and secret.get("key"):
            env.pop(name, None)
            secret_env[name] = _secret_ref(secret)
        else:
            warnings += _leaf_warnings(
                entry, here, "only env entries with a value or valueFrom.secretKeyRef are carried"
            )
    return warnings


def _chat_template(spec: dict[str, Any], where: str) -> tuple[str, list[str]]:
    """chatTemplate -> vLLM's chat_template: the template text when the values file has it
    (chatTemplateConfigMap, or Jinja in chatTemplate itself), else the chart's file path."""
    template = str(spec["chatTemplate"])
    if spec.get("chatTemplateConfigMap"):
        return str(spec["chatTemplateConfigMap"]), []
    if any(c in template for c in "{}\n"):
        return template, []
    path = template if template.startswith("/") else f"{CHAT_TEMPLATE_DIR}/{template}"
    return path, [
        f"{where}.chatTemplate: carried as engine_args.chat_template {path!r}, a file "
        f"production-stack mounts from its templates volume; the engine pods here must have it, "
        "or put the template's text in engine_args.chat_template"
    ]


def _model(spec: dict[str, Any], where: str, imported: Imported, shared_env: Any) -> dict:
    warn = imported.warnings
    url = spec.get("modelURL") or spec.get("name")
    model: dict[str, Any] = {"name": url, "source": url}
    if spec.get("name") and spec["name"] != url:
        model["aliases"] = [spec["name"]]
    # vLLM arguments in the chart's command-line order (a later flag wins)
    engine_args: dict[str, Any] = {}
    for key, (arg, kind) in MODEL_ARGS.items():
        if _set(spec.get(key)):
            engine_args[arg] = coerce(spec[key], kind, f"{where}.{key}")
    env: dict[str, str] = {}
    vllm_config = spec.get("vllmConfig") or {}
    if vllm_config:  # the chart passes --no-enable-prefix-caching unless it is enabled
        engine_args["enable_prefix_caching"] = False
    extra_args: dict[str, Any] = {}
    for key, value in vllm_config.items():
        here = f"{where}.vllmConfig.{key}"
        if key == "maxModelLen":
            model["max_model_len"] = coerce(value, PositiveInt, here)
        elif key == "dtype":
            if str(value) in DTYPES:
                model["dtype"] = DTYPES[str(value)]
            else:
                warn.append(f"{here}: dtype {value!r} is not one of {sorted(DTYPES)}; not carried")
        elif key in VLLM_ARGS:
            arg, kind = VLLM_ARGS[key]
            engine_args[arg] = coerce(value, kind, here)
        elif key == "extraArgs":
            extra_args, problems = parse_extra_args(value, here)
            warn += problems
        elif key == "v1":
            env["VLLM_USE_V1"] = "1" if value else "0"
        else:
            warn += _leaf_warnings(value, here, "unknown vllmConfig field; not carried")
    engine_args.update(extra_args)
    if _set(spec.get("modelRevision")):
        engine_args["revision"] = coerce(spec["modelRevision"], str, f"{where}.modelRevision")
    if _set(spec.get("chatTemplate")):
        engine_args["chat_template"], problems = _chat_template(spec, where)
        warn += problems
    kv_offload, lm_warnings = _lmcache(spec.get("lmcacheConfig") or {}, f"{where}.lmcacheConfig")
    if kv_offload is not None:
        model["kv_offload"] = kv_offload
    warn += lm_warnings
    # Pod environment in the chart's order: HF_TOKEN, servingEngineSpec.env, modelSpec.env.
    secret_env: dict[str, dict[str, str]] = {}
    token = spec.get("hf_token")
    if isinstance(token, dict) and token.get("secretName") and token.get("secretKey"):
        secret_env["HF_TOKEN"] = {"name": str(token["secretName"]), "key": str(token["secretKey"])}
    elif isinstance(token, str) and _set(token):
        key = "hf_token_" + re.sub(r"[^-._a-zA-Z0-9]", "_", str(spec.get("name") or url))
        imported.token_keys[url] = key
        secret_env["HF_TOKEN"] = {"name": HF_TOKEN_SECRET, "key": key}
        warn.append(
            f"{where}.hf_token: the token is not written to the manifests; this model's engine "
            f"reads it from Secret {HF_TOKEN_SECRET!r} key {key!r}"
        )
    elif _set(token):
        warn += _leaf_warnings(token, f"{where}.hf_token", "needs secretName and secretKey")
    warn += _env(shared_env or [], "servingEngineSpec.env", env, secret_env)
    warn += _env(spec.get("env") or [], f"{where}.env", env, secret_env)
    resources: dict[str, Any] = {}
    if "requestCPU" in spec:
        resources["cpu"] = coerce(spec["requestCPU"], float, f"{where}.requestCPU")
    if "requestGPU" in spec:
        resources["gpu"] = coerce(spec["requestGPU"], float, f"{where}.requestGPU")
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
    if "replicaCount" in spec:
        model["replicas"] = coerce(spec["replicaCount"], PositiveInt, f"{where}.replicaCount")
    if engine_args:
        model["engine_args"] = engine_args
    if env:
        model["env"] = env
    if secret_env:
        model["secret_env"] = secret_env
    if resources:
        model["resources"] = {k: _plain(v) for k, v in resources.items()}
    for key, value in spec.items():
        if key not in MODEL_FIELDS and key != "replicaCount":
            warn += _leaf_warnings(
                value, f"{where}.{key}", "not carried (Ray images and scheduling)"
            )
    return model


def _adapter_source(source: dict[str, Any], where: str) -> tuple[str | None, list[str]]:
    """A LoraAdapter's adapterSource -> our adapter `source` (None: no place for it)."""
    kind = str(source.get("type", ""))
    path = str(source.get("adapterPath") or "")
    repository = str(source.get("repository") or "")
    warnings = [
        f"{where}.{key}: not carried (each adapter is named in the config)"
        for key in ("pattern", "maxAdapters")
        if _set(source.get(key))
    ]
    if _set(source.get("credentials")) or _set(source.get("credentialsSecretRef")):
        warnings.append(
            f"{where}.credentials: not carried; give the engines the object store's "
            "credentials in the model's env or secret_env (e.g. AWS_ACCESS_KEY_ID)"
        )
    if kind == "local" and path:
        if not (Path(path).expanduser() / "adapter_config.json").is_file():
            return None, [
                *warnings,
                f"{where}.adapterPath: {path!r} holds no adapter on this "
                "machine (the config checks local adapters where it is made); put "
                "the adapter there, or give a huggingface or s3 source",
            ]
        return path, warnings
    if kind == "huggingface" and (repository or path):
        return repository or path, warnings
    if kind == "s3" and (repository or path):
        if path.startswith("s3://"):
            return path, warnings
        return "s3://" + "/".join(p.strip("/") for p in (repository, path) if p), warnings
    return None, [
        *warnings,
        f"{where}: type {kind!r}: only local (adapterPath), huggingface and s3 (repository "
        "or adapterPath) sources are carried; not carried",
    ]


def _lora_adapters(entries: Any, models: list[dict[str, Any]], warn: list[str]) -> None:
    """loraAdapters[] (production-stack's LoraAdapter resources) -> each base model's `lora`:
    its adapters, and enableLoRA / maxLoras / --max-lora-rank moved from its engine_args."""
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        where = f"loraAdapters[{index}]"
        if not isinstance(entry, dict) or entry.get("enabled") is False:
            continue
        base = str(entry.get("baseModel") or "")
        model = next((m for m in models if base in (m["name"], *m.get("aliases", []))), None)
        source = entry.get("adapterSource") or {}
        name = str(source.get("adapterName") or entry.get("name") or "")
        if model is None:
            warn.append(f"{where}: baseModel {base!r} is not an imported model; not carried")
            continue
        path, problems = _adapter_source(source, f"{where}.adapterSource")
        warn += problems
        if path is None or not name:
            continue
        lora = model.setdefault("lora", {"adapters": []})
        lora["adapters"].append({"name": name, "source": path})
        args = model.setdefault("engine_args", {})
        args.pop("enable_lora", None)
        for arg, key in (("max_loras", "max_active"), ("max_lora_rank", "max_rank"),
                         ("max_cpu_loras", "max_adapters_per_replica")):  # fmt: skip
            if arg in args:
                lora[key] = args.pop(arg)
        if "max_active" in lora:
            lora.setdefault("max_adapters_per_replica", max(lora["max_active"], 4))
        if not args:
            del model["engine_args"]
        for key in ("loraAdapterDeploymentConfig", "vllmApiKey"):
            if _set(entry.get(key)):
                warn.append(
                    f"{where}.{key}: not carried; replicas load the adapter when a request "
                    "names it, and the router keeps its requests on the replicas holding it"
                )


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
            if policy in policies:
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
            server["ingress_replicas"] = coerce(value, PositiveInt, where)
        else:
            imported.warnings += _leaf_warnings(value, where, "not carried")
    return router, server


def _auth(key: Any, imported: Imported) -> dict[str, Any]:
    """servingEngineSpec.vllmApiKey -> our `auth`: a literal key, or a Secret reference."""
    where = "servingEngineSpec.vllmApiKey"
    if isinstance(key, str) and _set(key):
        imported.warnings.append(
            f"{where}: carried as auth.api_keys, so the key is in the serve config and the "
            "RayService; to keep it in a Secret instead: kubectl create secret generic "
            "vllm-api-key --from-literal=keys=<key>, then replace auth.api_keys with "
            "auth.api_keys_secret: {name: vllm-api-key, key: keys}"
        )
        return {"api_keys": [str(key)]}
    if isinstance(key, dict) and key.get("secretName") and key.get("secretKey"):
        return {"api_keys_secret": {"name": str(key["secretName"]), "key": str(key["secretKey"])}}
    imported.warnings += _leaf_warnings(key, where, "needs secretName and secretKey; not carried")
    return {}


def import_values(values: dict[str, Any], *, app_name: str = "vrstack") -> Imported:
    """Convert parsed values; the serve config is validated (ConfigError if it cannot run)."""
    imported = Imported(serve_config={})
    engine_spec = values.get("servingEngineSpec") or {}
    if engine_spec.get("enableEngine", True) is False:
        raise ConfigError(
            "servingEngineSpec.enableEngine is false: production-stack deploys no engines "
            "from this file, so there is no model to import"
        )
    models = []
    for index, spec in enumerate(engine_spec.get("modelSpec") or []):
        where = f"servingEngineSpec.modelSpec[{index}]"
        if spec.get("enabled") is False:
            imported.warnings.append(
                f"{where} ({spec.get('name')!r}): enabled: false, so production-stack does not "
                "deploy it; skipped"
            )
            continue
        models.append(_model(spec, where, imported, engine_spec.get("env")))
    if not models:
        raise ConfigError("servingEngineSpec.modelSpec: no enabled model to import")
    if imported.token_keys:
        literals = " ".join(f"--from-literal={k}=<token>" for k in imported.token_keys.values())
        imported.warnings.append(
            f"hf_token: create the Secret the engines read: kubectl create secret generic "
            f"{HF_TOKEN_SECRET} {literals}"
        )
    auth = _auth(engine_spec.get("vllmApiKey"), imported)
    for key, value in engine_spec.items():
        if key not in ("modelSpec", "enableEngine", "env", "vllmApiKey"):
            imported.warnings += _leaf_warnings(
                value, f"servingEngineSpec.{key}", "not carried (Ray images and scheduling)"
            )
    _lora_adapters(values.get("loraAdapters") or [], models, imported.warnings)
    for model in models:
        if model.get("engine_args", {}).get("enable_lora") and "lora" not in model:
            imported.warnings.append(
                f"model {model['name']!r}: enableLoRA is carried as engine_args.enable_lora, "
                "but no loraAdapters entry names this model, so it serves no adapter"
            )
    router, server = _router(values.get("routerSpec") or {}, imported)
    for key, value in values.items():
        if key == "loraController":
            imported.warnings.append(
                "loraController: not carried; each engine replica loads the adapters of its "
                "model's `lora` settings when a request first names one"
            )
        elif key not in ("servingEngineSpec", "routerSpec", "loraAdapters"):
            imported.warnings += _leaf_warnings(value, key, "not carried")
    args: dict[str, Any] = {"models": models}
    if router:
        args["router"] = router
    if server:
        args["server"] = server
    if auth:
        args["auth"] = auth
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
