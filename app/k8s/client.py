"""apply / status / delete of rendered manifests with the official `kubernetes` client.

RayService and PodMonitor go through CustomObjectsApi, Service, PVC and ConfigMap through
CoreV1Api; apply is create-or-patch (JSON merge patch). Cluster problems become `K8sError` with a
message for people: no cluster configured or reachable, KubeRay CRD not installed, forbidden by
RBAC.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from app.k8s.package import COMPONENT_LABEL, PACKAGE_COMPONENT

MERGE_PATCH = "application/merge-patch+json"
KUBERAY_INSTALL = (
    "helm repo add kuberay https://ray-project.github.io/kuberay-helm/ && "
    "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0"
)
# kind -> (group, version, plural) for custom resources
CUSTOM = {
    "RayService": ("ray.io", "v1", "rayservices"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
}


class K8sError(RuntimeError):
    """A problem with the cluster, worded for the person at the terminal."""


@dataclass
class Connection:
    api: k8s.ApiClient
    namespace: str
    host: str


def connect(
    kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
) -> Connection:
    """An API client from a kubeconfig (or the in-cluster service account)."""
    try:
        api = k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
        _, active = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
            active = next((c for c in contexts if c["name"] == context), active)
        default_ns = (active or {}).get("context", {}).get("namespace") or "default"
    except (ConfigException, FileNotFoundError, OSError) as exc:
        try:
            k8s_config.load_incluster_config()
        except ConfigException:
            where = kubeconfig or "~/.kube/config (or $KUBECONFIG)"
            raise K8sError(
                f"no Kubernetes cluster configured: cannot load {where}: {exc}. "
                "Point --kubeconfig/KUBECONFIG at a cluster's kubeconfig."
            ) from None
        api = k8s.ApiClient()
        default_ns = "default"
    return Connection(api, namespace or default_ns, api.configuration.host)


def _fail(exc: Exception, what: str, conn: Connection) -> K8sError:
    if isinstance(exc, ApiException):
        message = _reason(exc)
        if exc.status == 403:
            return K8sError(
                f"forbidden: {what} in namespace {conn.namespace!r}: {message}. "
                "Ask a cluster admin for a Role allowing it (kubectl auth can-i ...)."
            )
        if exc.status == 401:
            return K8sError(f"unauthorized: {what}: the kubeconfig's credentials were refused")
        return K8sError(f"{what} failed ({exc.status}): {message}")
    return K8sError(
        f"cannot reach the Kubernetes API server at {conn.host} ({what}): "
        f"{type(exc).__name__}. Is the cluster running and the kubeconfig current?"
    )


def _reason(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


@dataclass
class Cluster:
    """One namespace of one cluster."""

    conn: Connection
    _apis: dict[str, bool] = field(default_factory=dict)

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.conn.api)

    @property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.conn.api)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs, _request_timeout=30)
        except ApiException as exc:
            if exc.status == 404:
                raise
            raise _fail(exc, what, self.conn) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _fail(exc, what, self.conn) from None

    def has_api(self, kind: str) -> bool:
        """Whether the cluster serves a custom resource kind (its CRD is installed)."""
        group, version, plural = CUSTOM[kind]
        if kind not in self._apis:
            try:
                found = self._call(
                    f"discover {group}/{version}", self.custom.get_api_resources, group, version
                )
                self._apis[kind] = any(r.name == plural for r in found.resources or [])
            except ApiException:
                self._apis[kind] = False
        return self._apis[kind]

    def require_kuberay(self) -> None:
        if not self.has_api("RayService"):
            raise K8sError(
                "the KubeRay CRDs are not installed on this cluster (no rayservices in the "
                f"ray.io/v1 API). Install the operator: {KUBERAY_INSTALL}"
            )

    # --- one object -------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        ns = self.conn.namespace
        try:
            if kind in CUSTOM:
                group, version, plural = CUSTOM[kind]
                return self._call(
                    f"get {plural}/{name}",
                    self.custom.get_namespaced_custom_object,
                    group, version, ns, plural, name,
                )  # fmt: skip
            read = {
                "Service": self.core.read_namespaced_service,
                "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
                "ConfigMap": self.core.read_namespaced_config_map,
            }[kind]
            return self.conn.api.sanitize_for_serialization(
                self._call(f"get {kind}/{name}", read, name, ns)
            )
        except ApiException:  # 404
            return None

    def apply_one(self, document: dict[str, Any]) -> str:
        """Create or patch one document; returns what happened ('created', 'configured', ...)."""
        kind, name, ns = document["kind"], document["metadata"]["name"], self.conn.namespace
        label = f"{kind.lower()}/{name}"
        if kind in CUSTOM and not self.has_api(kind):
            if kind == "RayService":
                self.require_kuberay()
            return f"{label} skipped (the {CUSTOM[kind][0]} CRD is not installed)"
        exists = self.get(kind, name) is not None
        if kind in CUSTOM:
            group, version, plural = CUSTOM[kind]
            if exists:
                self._call(
                    f"patch {plural}/{name}", self.custom.patch_namespaced_custom_object,
                    group, version, ns, plural, name, document, _content_type=MERGE_PATCH,
                )  # fmt: skip
                return f"{label} configured"
            self._call(
                f"create {plural}/{name}",
                self.custom.create_namespaced_custom_object,
                group, version, ns, plural, document,
            )  # fmt: skip
            return f"{label} created"
        if kind == "PersistentVolumeClaim":
            if exists:  # a claim's spec is immutable (except growing); keep the cache
                return f"{label} unchanged (kept)"
            self._call(
                f"create {label}", self.core.create_namespaced_persistent_volume_claim, ns, document
            )
            return f"{label} created"
        if kind == "ConfigMap":
            if exists:  # named after its content (the package's sdist): the same data
                return f"{label} unchanged"
            self._call(f"create {label}", self.core.create_namespaced_config_map, ns, document)
            return f"{label} created"
        if kind == "Service":
            if exists:
                self._call(
                    f"patch {label}", self.core.patch_namespaced_service, name, ns, document,
                    _content_type=MERGE_PATCH,
                )  # fmt: skip
                return f"{label} configured"
            self._call(f"create {label}", self.core.create_namespaced_service, ns, document)
            return f"{label} created"
        raise K8sError(f"{label}: kind {kind} is not handled by vrstack k8s apply")

    def delete_one(self, kind: str, name: str) -> str:
        ns, label = self.conn.namespace, f"{kind.lower()}/{name}"
        if kind in CUSTOM and not self.has_api(kind):
            return f"{label} skipped (the {CUSTOM[kind][0]} CRD is not installed)"
        try:
            if kind in CUSTOM:
                group, version, plural = CUSTOM[kind]
                self._call(
                    f"delete {plural}/{name}", self.custom.delete_namespaced_custom_object,
                    group, version, ns, plural, name,
                )  # fmt: skip
            elif kind == "Service":
                self._call(f"delete {label}", self.core.delete_namespaced_service, name, ns)
            elif kind == "PersistentVolumeClaim":
                self._call(
                    f"delete {label}", self.core.delete_namespaced_persistent_volume_claim, name, ns
                )
            elif kind == "ConfigMap":
                self._call(f"delete {label}", self.core.delete_namespaced_config_map, name, ns)
        except ApiException:  # 404
            return f"{label} not found"
        return f"{label} deleted"

    # --- whole stacks ----------------------------------------------------------------------

    def apply(self, documents: list[dict[str, Any]]) -> list[str]:
        """Apply rendered documents in order (the RayService first needs KubeRay)."""
        if any(d["kind"] == "RayService" for d in documents):
            self.require_kuberay()
        return [self.apply_one(d) for d in documents]

    def delete(self, documents: list[dict[str, Any]], *, keep_cache: bool = True) -> list[str]:
        """Delete rendered documents (the model-cache claim only with keep_cache=False), and
        every package ConfigMap of their RayServices (earlier versions' too)."""
        results = []
        for document in reversed(documents):
            if document["kind"] == "PersistentVolumeClaim" and keep_cache:
                results.append(f"persistentvolumeclaim/{document['metadata']['name']} kept")
                continue
            results.append(self.delete_one(document["kind"], document["metadata"]["name"]))
        done = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
        for document in documents:
            if document["kind"] == "RayService":
                for name in self.package_configmaps(document["metadata"]["name"]):
                    if name not in done:
                        results.append(self.delete_one("ConfigMap", name))
        return results

    def package_configmaps(self, name: str) -> list[str]:
        """The package ConfigMaps of RayService `name` (by label), sorted."""
        selector = f"app.kubernetes.io/instance={name},{COMPONENT_LABEL}={PACKAGE_COMPONENT}"
        try:
            found = self._call(
                "list configmaps",
                self.core.list_namespaced_config_map,
                self.conn.namespace,
                label_selector=selector,
            )
        except ApiException:  # 404
            return []
        return sorted(item.metadata.name for item in found.items or [])

    def rayservice(self, name: str) -> dict[str, Any]:
        self.require_kuberay()
        found = self.get("RayService", name)
        if found is None:
            raise K8sError(f"RayService {name!r} not found in namespace {self.conn.namespace!r}")
        return found

    def wait_ready(
        self,
        name: str,
        *,
        timeout_s: float = 900,
        poll_s: float = 5,
        on_update: Callable[[ServiceState], None] | None = None,
    ) -> ServiceState:
        """Poll the RayService until its Ready condition is True; K8sError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = ServiceState.of(self.rayservice(name))
            if on_update:
                on_update(state)
            if state.ready:
                return state
            if time.monotonic() >= deadline:
                raise K8sError(
                    f"RayService {name!r} not Ready after {timeout_s:.0f} s: {state.summary()}"
                )
            time.sleep(poll_s)


@dataclass(frozen=True)
class ServiceState:
    """What `status` shows of a RayService."""

    name: str
    ready: bool
    upgrading: bool
    reason: str
    message: str
    applications: dict[str, str]

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ServiceState:
        status = obj.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {})
        apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        if not apps:
            apps = (status.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}
        return cls(
            name=obj["metadata"]["name"],
            ready=ready.get("status") == "True",
            upgrading=conditions.get("UpgradeInProgress", {}).get("status") == "True",
            reason=str(ready.get("reason") or status.get("serviceStatus") or "Pending"),
            message=str(ready.get("message") or ""),
            applications={k: str(v.get("status", "?")) for k, v in sorted(apps.items())},
        )

    def summary(self) -> str:
        apps = ", ".join(f"{k}: {v}" for k, v in self.applications.items()) or "no applications yet"
        parts = ["Ready" if self.ready else f"not ready ({self.reason})", apps]
        if self.upgrading:
            parts.insert(1, "upgrade in progress")
        if self.message and not self.ready:
            parts.append(self.message)
        return "; ".join(parts)


def endpoints(name: str, namespace: str, port: int = 8000) -> dict[str, str]:
    """Where the stack answers: in-cluster URL and the production-stack-style port-forward
    (the router Service is the RayService's serveService, port 80 -> Serve's `port`)."""
    return {
        "in-cluster": f"http://{name}-router-service.{namespace}.svc.cluster.local",
        "router service": f"{name}-router-service (port 80)",
        "port-forward": f"kubectl -n {namespace} port-forward svc/{name}-router-service 30080:80",
    }
