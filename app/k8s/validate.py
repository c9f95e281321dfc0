"""Offline validation of rendered manifests: no API server needed.

- RayService / RayCluster: the KubeRay CRD's `openAPIV3Schema` (jsonschema), made strict the way
  `kubectl apply` (field validation "Strict") is: unknown fields are errors.
- Core kinds (Service, PVC, Secret, ...): Kubernetes' own schemas via `kubernetes-validate`.
- KubeRay's spec rules: what its controller refuses after the API server accepted the object
  (`app.k8s.spec_rules`, from KubeRay v1.7.0's validation.go).
- Ours: serveConfigV2 parses as our config and passes its validation, HTTP host 0.0.0.0,
  quantities parse, names fit Kubernetes' and KubeRay's limits.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from app.config import ConfigError, parse_quantity
from app.k8s.render import MAX_NAME_LENGTH
from app.k8s.spec_rules import (
    DNS_1035_LABEL,
    DNS_1123_LABEL,
    DNS_1123_SUBDOMAIN,
    MAX_RAY_CLUSTER_NAME_LENGTH,
    spec_rule_errors,
)
from app.serve_config import read_serve_config

KUBERNETES_VERSION = "1.33"
CORE_KINDS = {"Service", "PersistentVolumeClaim", "Secret", "ConfigMap", "ServiceAccount"}


def _strict(schema: Any) -> Any:
    """Unknown fields become errors wherever the schema lists its properties."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas(crd_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every CRD file in `crd_dir`."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def _schema_errors(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(top level)'}: {err.message}"
        for err in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def core_errors(document: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Errors of a core-kind document against Kubernetes' schema (strict: unknown fields)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(top level)"
        return [f"{path}: {exc.message}"]
    return []


def _quantities(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value under a `requests`/`limits` map, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("requests", "limits") and isinstance(value, dict):
                for name, quantity in value.items():
                    yield f"{here}.{name}", quantity
            else:
                yield from _quantities(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _quantities(value, f"{path}[{index}]")


def _name_errors(document: dict[str, Any]) -> list[str]:
    name = str((document.get("metadata") or {}).get("name", ""))
    kind = document.get("kind")
    errors = []
    if kind == "RayService":  # ValidateRayServiceMetadata
        if len(name) > MAX_NAME_LENGTH or not DNS_1035_LABEL.match(name):
            errors.append(
                f"metadata.name: {name!r} must be a DNS-1035 label of at most "
                f"{MAX_NAME_LENGTH} characters (KubeRay appends a suffix)"
            )
        for suffix in ("-head-svc", "-serve-svc", "-router-service"):
            if len(name + suffix) > 63:
                errors.append(f"metadata.name: {name + suffix!r} would exceed 63 characters")
        groups = (document.get("spec") or {}).get("rayClusterConfig", {}).get("workerGroupSpecs")
        for index, group in enumerate(groups or []):
            group_name = str(group.get("groupName", ""))
            if len(group_name) > 63 or not DNS_1123_LABEL.match(group_name):
                errors.append(f"workerGroupSpecs[{index}].groupName: {group_name!r} is no label")
    elif kind == "RayCluster":  # ValidateRayClusterMetadata
        if len(name) > MAX_RAY_CLUSTER_NAME_LENGTH or not DNS_1035_LABEL.match(name):
            errors.append(
                f"metadata.name: {name!r} must be a DNS-1035 label of at most "
                f"{MAX_RAY_CLUSTER_NAME_LENGTH} characters"
            )
    elif kind in ("Service",):
        if len(name) > 63 or not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
            errors.append(f"metadata.name: {name!r} must be a DNS-1035 label (<= 63 characters)")
    elif len(name) > 253 or not DNS_1123_SUBDOMAIN.match(name):
        errors.append(f"metadata.name: {name!r} must be a DNS-1123 subdomain")
    return errors


def serve_config_errors(text: str) -> list[str]:
    """serveConfigV2 must parse as a serve config of ours, valid, with HTTP on 0.0.0.0."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(text)
        handle.flush()
        try:
            loaded = read_serve_config(handle.name)
        except ConfigError as exc:
            return [f"spec.serveConfigV2: {str(exc).replace(handle.name, 'serveConfigV2')}"]
    if loaded.http_host != "0.0.0.0":
        return [f"spec.serveConfigV2: http_options.host is {loaded.http_host!r}, not '0.0.0.0'"]
    return []


def _pod_monitor_errors(document: dict[str, Any]) -> list[str]:
    """PodMonitor (Prometheus operator CRD, schema not available offline): its required shape."""
    spec = document.get("spec") or {}
    errors = []
    if not isinstance((spec.get("selector") or {}).get("matchLabels"), dict):
        errors.append("spec.selector.matchLabels: missing")
    endpoints = spec.get("podMetricsEndpoints")
    if not endpoints or not all(isinstance(e, dict) and e.get("port") for e in endpoints):
        errors.append("spec.podMetricsEndpoints: needs entries with a port name")
    return errors


def document_errors(document: dict[str, Any], crd_dir: str | Path | None) -> list[str]:
    """Every problem found in one manifest document (empty when it is fine)."""
    if not isinstance(document, dict) or "kind" not in document or "apiVersion" not in document:
        return ["(top level): not a Kubernetes object (apiVersion and kind are required)"]
    key = (document["apiVersion"], document["kind"])
    errors = _name_errors(document)
    for path, value in _quantities(document.get("spec")):
        try:
            parse_quantity(value)
        except ValueError as exc:
            errors.append(f"spec.{path}: {exc}")
    if document["apiVersion"].startswith("ray.io/"):
        if crd_dir is not None:
            schema = crd_schemas(str(crd_dir)).get(key)
            if schema is None:
                errors.append(f"(top level): no CRD schema for {key[0]} {key[1]} in {crd_dir}")
            else:
                errors += _schema_errors(document, schema)
        errors += spec_rule_errors(document)
        if document["kind"] == "RayService":
            errors += serve_config_errors(str(document.get("spec", {}).get("serveConfigV2", "")))
    elif document["kind"] == "PodMonitor":
        errors += _pod_monitor_errors(document)
    elif document["kind"] in CORE_KINDS and "/" not in document["apiVersion"]:
        errors += core_errors(document)
    return errors


def file_errors(path: str | Path, crd_dir: str | Path | None) -> list[str]:
    """Problems of every document of a manifest file, each prefixed by the document's name."""
    errors = []
    for document in yaml.safe_load_all(Path(path).read_text()):
        if document is None:
            continue
        where = (
            f"{Path(path).name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        )
        errors += [f"{where}: {e}" for e in document_errors(document, crd_dir)]
    return errors
