"""KubeRay's spec rules, offline: what KubeRay v1.7.0's controllers refuse in a RayService or
RayCluster that the API server (and so the CRD schema) accepted. `spec_rule_errors` is the entry
point; `app.k8s.validate` runs it on every `ray.io` document.
"""

from __future__ import annotations

import re
from typing import Any

from app.k8s.options import INCREMENTAL_UPGRADE

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)

# KubeRay's spec rules: what KubeRay v1.7.0's controllers refuse although the API server accepted
# the object (the RayService is marked invalid and gets no cluster). Read from ray-project/kuberay
# tag v1.7.0, ray-operator/controllers/ray/utils/validation.go unless noted; each rule names the Go
# function it mirrors, the messages are ours. Left out: what depends on the running operator
# (feature gates: a field refused only because its gate is off, or allowed only when it is on).
RAY_SERVICE_UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
RAY_CLUSTER_UPGRADE_TYPES = ("Recreate", "None")
MAX_RAY_CLUSTER_NAME_LENGTH = 53  # 63 - len("-serve-svc")
# CRD defaults the rules read: the API server fills them in before the controller looks.
CRD_DEFAULTS = {"minReplicas": 0, "maxReplicas": 2**31 - 1, "maxSurgePercent": 100}
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
GO_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_DURATION_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "m": 60,
    "h": 3600,
}
COLLECTOR_MANAGED_ENV = {
    "POD_IP",
    "FQ_RAY_IP",
    "RAY_CLUSTER_NAME",
    "RAY_CLUSTER_NAMESPACE",
    "RAY_ROLE",
    "OWNER_KIND",
    "OWNER_NAME",
    "EVENTS_PORT",
}
COLLECTOR_BACKEND_ENV = {
    "GCS": ("GCS_BUCKET",),
    "S3": ("S3_REGION",),
    "ALIYUNOSS": ("OSS_BUCKET", "OSS_ENDPOINT", "OSS_REGION"),
}
TLS_ENV = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pod_spec(group: dict[str, Any]) -> dict[str, Any]:
    return _dict(_dict(group.get("template")).get("spec"))


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay takes the first container of a group's pod as the Ray container."""
    containers = _list(_pod_spec(group).get("containers"))
    return _dict(containers[0]) if containers else {}


def _env(entries: Any) -> dict[str, dict[str, Any]]:
    return {str(e.get("name")): e for e in _list(entries) if isinstance(e, dict)}


def _truthy_env(env: dict[str, dict[str, Any]], name: str) -> bool:
    return str(env.get(name, {}).get("value")) in ("1", "true")


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, group) of the head group and every worker group of a RayCluster spec."""
    workers = _list(spec.get("workerGroupSpecs"))
    return [("headGroupSpec", _dict(spec.get("headGroupSpec")))] + [
        (f"workerGroupSpecs[{index}]", _dict(group)) for index, group in enumerate(workers)
    ]


def go_duration_seconds(text: str) -> float | None:
    """Seconds of a Go duration ("90s", "1h30m", "0"); None where Go's ParseDuration fails."""
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    if body == "0":
        return 0.0
    if not body or GO_DURATION.sub("", body):
        return None
    return sign * sum(float(n) * GO_DURATION_UNIT[unit] for n, unit in GO_DURATION.findall(body))


def generic_version(text: Any) -> tuple[int, ...] | None:
    """A version's numbers as Kubernetes' version.ParseGeneric reads them (at least major.minor,
    whatever follows the numbers ignored); None where it fails."""
    match = re.match(r"^\s*v?([0-9]+(?:\.[0-9]+)*)", str(text))
    if not match:
        return None
    numbers = match.group(1).split(".")
    if len(numbers) < 2 or (len(numbers[0]) > 1 and numbers[0].startswith("0")):
        return None
    return tuple(int(n) for n in numbers)


def _older(version: tuple[int, ...] | None, minimum: tuple[int, ...]) -> bool:
    """True unless `version` is at least `minimum` (missing fields count as 0)."""
    if version is None:
        return True
    width = max(len(version), len(minimum))
    return version + (0,) * (width - len(version)) < minimum + (0,) * (width - len(minimum))


def _label_errors(labels: dict[str, Any]) -> list[str]:
    """Kubernetes' label syntax (IsQualifiedName keys, IsValidLabelValue values)."""
    errors = []
    for key, value in labels.items():
        prefix, slash, name = str(key).rpartition("/")
        if (
            len(name) > 63
            or not QUALIFIED_NAME.match(name)
            or (slash and (len(prefix) > 253 or not DNS_1123_SUBDOMAIN.match(prefix)))
        ):
            errors.append(f"{key!r} is not a label key (a name, or prefix/name: example.com/x)")
        if value and (len(str(value)) > 63 or not QUALIFIED_NAME.match(str(value))):
            errors.append(
                f"{value!r} (key {key!r}) is not a label value: at most 63 letters, digits, "
                "'-', '_' or '.', beginning and ending with a letter or digit"
            )
    return errors


def _group_errors(group: dict[str, Any], what: str) -> list[str]:
    """Rules for the head group and for each worker group (paths relative to the group)."""
    params = _dict(group.get("rayStartParams"))
    errors = []
    if not _list(_pod_spec(group).get("containers")):
        errors.append(f"template.spec.containers: the {what} needs at least one container")
    # validateRayGroupResources
    ray_resources = any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources"))
    if ray_resources and _dict(group.get("resources")):
        errors.append(
            f"resources: the {what} sets Ray resources both here and in rayStartParams "
            "(num-cpus, num-gpus, memory, resources); use only one of the two"
        )
    # validateRayGroupLabels
    if "labels" in params:
        errors.append(f"rayStartParams.labels: not supported for the {what}; use `labels`")
    errors += [f"labels: {e}" for e in _label_errors(_dict(group.get("labels")))]
    return errors


def _worker_errors(
    group: dict[str, Any], ray_version: Any, *, v2: bool, autoscaling: bool, never_restart: bool
) -> list[str]:
    """ValidateRayClusterSpec's rules for one worker group (paths relative to the group)."""
    name = group.get("groupName")
    errors = _group_errors(group, f"worker group {name}")
    # (KubeRay also asks for both minReplicas and maxReplicas without autoscaling; the CRD's
    # defaults always set them, so that rule never fires behind an API server.)
    low = _int(group.get("minReplicas", CRD_DEFAULTS["minReplicas"]))
    high = _int(group.get("maxReplicas", CRD_DEFAULTS["maxReplicas"]))
    for key, value in (("minReplicas", low), ("maxReplicas", high)):
        if value is not None and value < 0:
            errors.append(f"{key}: worker group {name} has a negative {key} ({value})")
    if low is not None and high is not None and low > high:
        errors.append(
            f"minReplicas: worker group {name} has minReplicas {low} greater than maxReplicas "
            f"{high}; lower minReplicas or raise maxReplicas"
        )
    # validateWorkerGroupIdleTimeout
    idle = _int(group.get("idleTimeoutSeconds"))
    if idle is not None and idle < 0:
        errors.append(f"idleTimeoutSeconds: must not be negative (got {idle})")
    elif idle is not None and not v2:
        errors.append("idleTimeoutSeconds: needs autoscaler v2 (autoscalerOptions.version: v2)")
    # validateWorkerGroupPriority
    if _int(group.get("priority")):
        if _older(generic_version(ray_version) if ray_version else None, (2, 56, 0)):
            errors.append(f"priority: needs rayVersion 2.56.0 or later (got {ray_version!r})")
        elif not v2:
            errors.append("priority: needs autoscaler v2 (autoscalerOptions.version: v2)")
    if autoscaling and group.get("suspend") is True:
        errors.append("suspend: a worker group cannot be suspended while autoscaling is on")
    if never_restart and _pod_spec(group).get("restartPolicy") not in (None, "", "Never"):
        errors.append("template.spec.restartPolicy: must be Never or unset with autoscaler v2")
    return errors


def _gcs_errors(spec: dict[str, Any], annotations: dict[str, Any]) -> list[str]:
    """GCS fault tolerance rules (ValidateRayClusterSpec, validateGcsFaultToleranceBackend)."""
    head = _dict(spec.get("headGroupSpec"))
    params, container = _dict(head.get("rayStartParams")), _ray_container(head)
    env = _env(container.get("env"))
    errors = []
    if params.get("redis-username") or "REDIS_USERNAME" in env:
        errors.append(
            "headGroupSpec: set the Redis user name as gcsFaultToleranceOptions.redisUsername, "
            "not in rayStartParams or env"
        )
    if spec.get("gcsFaultToleranceOptions") is None:
        ft_annotation = str(annotations.get("ray.io/ft-enabled", "")).lower() == "true"
        if not ft_annotation and "RAY_REDIS_ADDRESS" in env:
            errors.append(
                "headGroupSpec: env RAY_REDIS_ADDRESS turns GCS fault tolerance on implicitly; "
                "set gcsFaultToleranceOptions instead"
            )
        return errors
    options = _dict(spec["gcsFaultToleranceOptions"])
    replaced = {
        "metadata.annotations[ray.io/ft-enabled]": annotations.get("ray.io/ft-enabled"),
        "headGroupSpec.rayStartParams.redis-password": params.get("redis-password"),
        "headGroupSpec env REDIS_PASSWORD": "REDIS_PASSWORD" in env,
        "headGroupSpec env RAY_REDIS_ADDRESS": "RAY_REDIS_ADDRESS" in env,
        "metadata.annotations[ray.io/external-storage-namespace]": annotations.get(
            "ray.io/external-storage-namespace"
        ),
    }
    errors += [
        f"{where}: not allowed with gcsFaultToleranceOptions; set it there instead"
        for where, present in replaced.items()
        if present
    ]
    if options.get("backend") != "rocksdb":
        if options.get("storage") is not None:
            errors.append("gcsFaultToleranceOptions.storage: only for backend rocksdb")
        return errors
    redis_only = [k for k in ("redisAddress", "externalStorageNamespace") if options.get(k)]
    redis_only += [k for k in ("redisUsername", "redisPassword") if options.get(k) is not None]
    errors += [
        f"gcsFaultToleranceOptions.{k}: not allowed with backend rocksdb" for k in redis_only
    ]
    storage = _dict(options.get("storage"))
    exclusive = [storage.get("size"), storage.get("storageClassName")]
    if storage.get("claimName") and (
        any(v is not None for v in exclusive) or _list(storage.get("accessModes"))
    ):
        errors.append(
            "gcsFaultToleranceOptions.storage.claimName: excludes size, storageClassName and "
            "accessModes"
        )
    mounts = [_dict(m) for m in _list(container.get("volumeMounts"))]
    volumes = [_dict(v) for v in _list(_pod_spec(head).get("volumes"))]
    if (
        {"RAY_gcs_storage", "RAY_gcs_storage_path"} & env.keys()
        or any(m.get("mountPath") == "/data/gcs" or m.get("name") == "gcs-storage" for m in mounts)
        or any(v.get("name") == "gcs-storage" for v in volumes)
    ):
        errors.append(
            "headGroupSpec: with backend rocksdb KubeRay manages the gcs-storage volume "
            "(/data/gcs) and env RAY_gcs_storage(_path); remove yours"
        )
    return errors


def _history_errors(spec: dict[str, Any]) -> list[str]:
    """History server rules (ValidateRayClusterSpec, validateCollectorOptions)."""
    if spec.get("historyServerOptions") is None:
        return []
    at = "historyServerOptions.collectorOptions"
    collector = _dict(spec["historyServerOptions"]).get("collectorOptions")
    if collector is None:
        return [f"{at}: required with historyServerOptions"]
    collector = _dict(collector)
    env = _env(collector.get("env"))

    def has(name: str) -> bool:
        entry = env.get(name, {})
        return bool(entry.get("value") or entry.get("valueFrom"))

    errors = [] if collector.get("image") else [f"{at}.image: required"]
    errors += [
        f"{at}.env: {n} is set by KubeRay" for n in sorted(COLLECTOR_MANAGED_ENV & env.keys())
    ]
    backend = str(env.get("STORAGE_BACKEND", {}).get("value") or "")
    needed = COLLECTOR_BACKEND_ENV.get(backend.upper(), ())
    if not backend:
        errors.append(f"{at}.env: STORAGE_BACKEND with a literal value is required")
    elif backend.upper() == "AZUREBLOB":
        mode = str(env.get("AZURE_STORAGE_AUTH_MODE", {}).get("value") or "").strip().lower()
        if mode == "connection_string":
            needed = ("AZURE_STORAGE_CONNECTION_STRING",)
        elif mode in ("workload_identity", "default"):
            needed = ("AZURE_STORAGE_ACCOUNT_URL",)
        elif not has("AZURE_STORAGE_CONNECTION_STRING") and not has("AZURE_STORAGE_ACCOUNT_URL"):
            errors.append(
                f"{at}.env: STORAGE_BACKEND AZUREBLOB needs AZURE_STORAGE_CONNECTION_STRING or "
                "AZURE_STORAGE_ACCOUNT_URL"
            )
    errors += [
        f"{at}.env: STORAGE_BACKEND {backend} needs {name}" for name in needed if not has(name)
    ]
    for where, group in _groups(spec):
        names = [_dict(c).get("name") for c in _list(_pod_spec(group).get("containers"))]
        if "ray-history-collector" in names:
            errors.append(
                f"{where}: the container name ray-history-collector is KubeRay's own with "
                "historyServerOptions; rename yours"
            )
    return errors


def _auth_errors(spec: dict[str, Any]) -> list[str]:
    """Ray token authentication rules (ValidateRayClusterSpec)."""
    auth = _dict(spec.get("authOptions"))
    k8s_tokens = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") != "token":
        if k8s_tokens:
            return ["authOptions.enableK8sTokenAuth: needs authOptions.mode: token"]
        return []
    errors = []
    raw = spec.get("rayVersion")
    version = generic_version(raw) if raw else None
    if _older(version, (2, 52, 0)):
        errors.append(f"rayVersion: token authentication needs Ray 2.52.0 or later (got {raw!r})")
    if k8s_tokens and _older(version, (2, 55, 0)):
        errors.append(f"rayVersion: enableK8sTokenAuth needs Ray 2.55.0 or later (got {raw!r})")
    if k8s_tokens and auth.get("secretName"):
        errors.append("authOptions.secretName: not allowed with enableK8sTokenAuth")
    return errors


def _network_policy_errors(spec: dict[str, Any]) -> list[str]:
    """validateNetworkPolicy: rules that contradict the mode, groups that do not exist."""
    if spec.get("networkPolicy") is None:
        return []
    policy = _dict(spec["networkPolicy"])
    mode = policy.get("mode") or "DenyAll"
    # a mode that restricts only one direction leaves no rules to give for the other
    unrestricted = {"DenyAllEgress": "ingressRules", "DenyAllIngress": "egressRules"}.get(mode)
    errors = []
    names = set()
    for index, group in enumerate(_list(spec.get("workerGroupSpecs"))):
        name = str(_dict(group).get("groupName"))
        names.add(name)
        if len(name) > 63 or not DNS_1123_LABEL.match(name):
            errors.append(
                f"workerGroupSpecs[{index}].groupName: {name!r} must be a DNS-1123 label with "
                "networkPolicy (it becomes part of a NetworkPolicy's name)"
            )
    parts = [("head", _dict(policy.get("head"))), ("worker", _dict(policy.get("worker")))]
    for index, entry in enumerate(_list(policy.get("workerGroups"))):
        entry = _dict(entry)
        parts.append((f"workerGroups[{index}]", entry))
        if entry.get("groupName") not in names:
            errors.append(
                f"networkPolicy.workerGroups[{index}].groupName: {entry.get('groupName')!r} "
                "names no group of workerGroupSpecs"
            )
    for where, rules in parts:
        if unrestricted and _list(rules.get(unrestricted)):
            errors.append(
                f"networkPolicy.{where}.{unrestricted}: cannot be set with mode {mode} "
                "(that direction is not restricted)"
            )
    return errors


def _tls_errors(spec: dict[str, Any]) -> list[str]:
    """validateTLSOptions: with TLS on, KubeRay owns the TLS env and the ray-tls volume."""
    if _dict(spec.get("tlsOptions")).get("enabled") is not True:
        return []
    autoscaler = _dict(spec.get("autoscalerOptions"))
    places = [(w, _ray_container(g)) for w, g in _groups(spec)]
    places.append(("autoscalerOptions", autoscaler))
    errors = []
    for where, holder in places:
        env = _env(holder.get("env"))
        errors += [
            f"{where}: env {n} is set by KubeRay with tlsOptions" for n in TLS_ENV if n in env
        ]
        for mount in map(_dict, _list(holder.get("volumeMounts"))):
            if mount.get("name") == "ray-tls" or mount.get("mountPath") == "/etc/ray/tls":
                errors.append(
                    f"{where}: the volume mount ray-tls (/etc/ray/tls) is KubeRay's with "
                    "tlsOptions; remove yours"
                )
    return errors


def cluster_spec_errors(spec: dict[str, Any], annotations: dict[str, Any]) -> list[str]:
    """KubeRay's rules for a RayCluster spec (ValidateRayClusterSpec), paths relative to it."""
    head = _dict(spec.get("headGroupSpec"))
    head_env = _env(_ray_container(head).get("env"))
    autoscaler = _dict(spec.get("autoscalerOptions"))
    autoscaling = spec.get("enableInTreeAutoscaling") is True
    v2_option = autoscaler.get("version") == "v2"  # IsAutoscalingV2Enabled
    v2 = v2_option or _truthy_env(head_env, AUTOSCALER_V2_ENV)
    errors = [f"headGroupSpec.{e}" for e in _group_errors(head, "head group")]
    head_restart = _pod_spec(head).get("restartPolicy")
    if autoscaling and v2_option and head_restart not in (None, "", "Never"):
        errors.append(
            "headGroupSpec.template.spec.restartPolicy: must be Never or unset with autoscaler v2"
        )
    seen: set[str] = set()
    for index, group in enumerate(_list(spec.get("workerGroupSpecs"))):
        group = _dict(group)
        found = _worker_errors(
            group,
            spec.get("rayVersion"),
            v2=v2,
            autoscaling=autoscaling,
            never_restart=autoscaling and v2_option,
        )
        # the RayCluster webhook's validateWorkerGroups (pkg/webhooks/v1/raycluster_webhook.go)
        if group.get("groupName") in seen:
            found.append(f"groupName: {group.get('groupName')!r} is used by another worker group")
        seen.add(group.get("groupName"))
        errors += [f"workerGroupSpecs[{index}].{e}" for e in found]
    errors += _gcs_errors(spec, annotations)
    if not autoscaling and _truthy_env(head_env, AUTOSCALER_V2_ENV):
        errors.append(f"headGroupSpec: env {AUTOSCALER_V2_ENV} needs enableInTreeAutoscaling: true")
    if autoscaling and autoscaler.get("version") is not None and AUTOSCALER_V2_ENV in head_env:
        errors.append(
            f"autoscalerOptions.version: the head also sets env {AUTOSCALER_V2_ENV}; keep only "
            "autoscalerOptions.version"
        )
    idle = _int(autoscaler.get("idleTimeoutSeconds"))
    if idle is not None and idle < 0:
        errors.append(f"autoscalerOptions.idleTimeoutSeconds: must not be negative (got {idle})")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env(autoscaler.get("env")):
        errors.append("autoscalerOptions.env: KUBERAY_GEN_AUTOSCALER_START_CMD is set by KubeRay")
    return (
        errors
        + _history_errors(spec)
        + _auth_errors(spec)
        + _network_policy_errors(spec)
        + _tls_errors(spec)
    )


def cluster_upgrade_errors(spec: dict[str, Any]) -> list[str]:
    """What NewClusterWithIncrementalUpgrade needs (ValidateClusterUpgradeOptions): the Ray
    autoscaler and clusterUpgradeOptions within bounds. `spec` is a RayService's spec."""
    at = "spec.upgradeStrategy.clusterUpgradeOptions"
    errors = []
    if _dict(spec.get("rayClusterConfig")).get("enableInTreeAutoscaling") is not True:
        errors.append(
            "spec.rayClusterConfig.enableInTreeAutoscaling: NewClusterWithIncrementalUpgrade "
            "needs the Ray autoscaler (true)"
        )
    options = _dict(spec.get("upgradeStrategy")).get("clusterUpgradeOptions")
    if options is None:
        return [*errors, f"{at}: required with NewClusterWithIncrementalUpgrade"]
    options = _dict(options)
    surge = _int(options.get("maxSurgePercent", CRD_DEFAULTS["maxSurgePercent"]))
    step = _int(options.get("stepSizePercent"))
    interval = _int(options.get("intervalSeconds"))
    surge_ok = surge is not None and 0 <= surge <= 100
    if not surge_ok:
        errors.append(f"{at}.maxSurgePercent: must be between 0 and 100 (got {surge})")
    if step is None or not 0 <= step <= 100:
        errors.append(f"{at}.stepSizePercent: must be between 0 and 100 (got {step})")
    elif surge is not None and surge_ok and step > surge:
        errors.append(
            f"{at}.stepSizePercent: {step} is more than maxSurgePercent {surge} (traffic cannot "
            "move faster than capacity grows); lower the step or raise the surge"
        )
    if interval is None or interval <= 0:
        errors.append(f"{at}.intervalSeconds: must be more than 0 (got {interval})")
    if not options.get("gatewayClassName"):
        errors.append(
            f"{at}.gatewayClassName: required, the name of a GatewayClass of the cluster "
            "(`kubectl get gatewayclass`)"
        )
    return errors


def _serve_port_errors(spec: dict[str, Any], incremental: bool) -> list[str]:
    """BuildServeService (controllers/ray/common/service.go): the Serve service needs a head
    port named `serve` or `serve-*` (KubeRay assumes its defaults when no port is declared),
    unless spec.serveService brings one; with incremental upgrades serveService is not used."""
    head = _dict(_dict(spec.get("rayClusterConfig")).get("headGroupSpec"))
    ports = [_dict(p) for p in _list(_ray_container(head).get("ports"))]
    named = [str(p.get("name") or f"{p.get('containerPort')}-port") for p in ports]
    if not ports or any(n == "serve" or n.startswith("serve-") for n in named):
        return []
    if spec.get("serveService") is not None and not incremental:
        return []
    return [
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports: no port named "
        "'serve' (or 'serve-...'), so KubeRay creates no Serve service; name the Serve port"
    ]


def rayservice_rule_errors(document: dict[str, Any]) -> list[str]:
    """KubeRay's rules for a RayService (ValidateRayServiceMetadata, ValidateRayServiceSpec)."""
    metadata, spec = _dict(document.get("metadata")), _dict(document.get("spec"))
    annotations = _dict(metadata.get("annotations"))
    cluster = _dict(spec.get("rayClusterConfig"))
    errors = []
    # ValidateRayServiceMetadata (the name: _name_errors), validateInitializingTimeout
    timeout = annotations.get(INITIALIZING_TIMEOUT)
    if timeout:
        seconds = go_duration_seconds(str(timeout))
        if seconds is None and re.fullmatch(r"[+-]?\d+", str(timeout)):
            seconds = int(timeout)
        if seconds is None or seconds <= 0:
            errors.append(
                f"metadata.annotations[{INITIALIZING_TIMEOUT}]: {timeout!r} is not a positive "
                "duration ('30m', '1h') or number of seconds"
            )
    if _dict(cluster.get("authOptions")).get("enableK8sTokenAuth") is True:
        errors.append(
            "spec.rayClusterConfig.authOptions.enableK8sTokenAuth: not supported for RayService"
        )
    errors += [f"spec.rayClusterConfig.{e}" for e in cluster_spec_errors(cluster, annotations)]
    head_service = _dict(_dict(cluster.get("headGroupSpec")).get("headService"))
    if _dict(head_service.get("metadata")).get("name"):
        errors.append(
            "spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set "
            "for a RayService (KubeRay names the head service)"
        )
    kind = _dict(spec.get("upgradeStrategy")).get("type")
    if kind is not None and kind not in RAY_SERVICE_UPGRADE_TYPES:
        errors.append(
            f"spec.upgradeStrategy.type: {kind!r} is not an upgrade strategy; use "
            f"{', '.join(RAY_SERVICE_UPGRADE_TYPES[:-1])} or {RAY_SERVICE_UPGRADE_TYPES[-1]}"
        )
    delay = _int(spec.get("rayClusterDeletionDelaySeconds"))
    if delay is not None and delay < 0:
        errors.append(f"spec.rayClusterDeletionDelaySeconds: must not be negative (got {delay})")
    incremental = kind == INCREMENTAL_UPGRADE
    if incremental:
        errors += cluster_upgrade_errors(spec)
        if spec.get("serveService") is not None:
            # Not a refusal: BuildServeService ignores serveService with incremental upgrades.
            errors.append(
                "spec.serveService: KubeRay ignores it with NewClusterWithIncrementalUpgrade "
                "(traffic enters through the Gateway <name>-gateway), so this Service would "
                "never exist; remove it"
            )
    return errors + _serve_port_errors(spec, incremental)


def raycluster_rule_errors(document: dict[str, Any]) -> list[str]:
    """KubeRay's rules for a RayCluster (ValidateRayClusterSpec, -UpgradeOptions, -Metadata in
    _name_errors)."""
    metadata, spec = _dict(document.get("metadata")), _dict(document.get("spec"))
    errors = [f"spec.{e}" for e in cluster_spec_errors(spec, _dict(metadata.get("annotations")))]
    kind = _dict(spec.get("upgradeStrategy")).get("type")
    if kind is not None and kind not in RAY_CLUSTER_UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type: {kind!r} is neither Recreate nor None")
    creator = _dict(metadata.get("labels")).get("ray.io/originated-from-crd")
    if kind is not None and creator in ("RayJob", "RayService"):
        errors.append(
            f"spec.upgradeStrategy: not allowed on a RayCluster made by a {creator}; set the "
            f"{creator}'s own upgrade settings"
        )
    return errors


def spec_rule_errors(document: dict[str, Any]) -> list[str]:
    """KubeRay's spec rules for a RayService or RayCluster document (else none)."""
    if document.get("kind") == "RayService":
        return rayservice_rule_errors(document)
    if document.get("kind") == "RayCluster":
        return raycluster_rule_errors(document)
    return []
