"""`vrstack k8s render`: kuberay/ is rendered from serve_configs/ (no drift), and every document
validates offline against the KubeRay CRD schemas and Kubernetes' own schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.config import load_config, parse_quantity
from app.k8s.render import (
    CPU_BASE_IMAGE,
    DOCKERFILES,
    GPU_BASE_IMAGE,
    GPU_IMAGE,
    RenderOptions,
    companion_files,
    default_name,
    render_documents,
    render_file,
)
from app.k8s.validate import crd_schemas, document_errors, file_errors
from app.serve_config import read_serve_config
from tests.conftest import ROOT, SERVE_CONFIGS

KUBERAY = ROOT / "kuberay"
CRDS = Path("/work/shared/kuberay/crds")
needs_crds = pytest.mark.skipif(
    not (CRDS / "ray.io_rayservices.yaml").is_file(),
    reason=f"KubeRay CRD schemas not found in {CRDS} (test data kept outside the project)",
)
CONFIGS = sorted(SERVE_CONFIGS.glob("*.yaml"))
STACK_MANIFESTS = [KUBERAY / f"{c.stem}.yaml" for c in CONFIGS]  # not the dashboard ConfigMap


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_checked_in_manifest_matches_its_serve_config(config):
    target = KUBERAY / f"{config.stem}.yaml"
    assert target.is_file(), f"{target} missing: run `vrstack k8s render --all`"
    assert render_file(config) == target.read_text(), (
        f"{target} drifted from {config}: run `vrstack k8s render --all`"
    )


def test_every_manifest_in_kuberay_comes_from_a_serve_config():
    # ... or is a companion of every stack (the Grafana dashboard, tests/test_dashboard.py)
    companions = {p.stem for p in companion_files(KUBERAY) if p.parent == KUBERAY}
    assert companions == {"grafana-dashboard"}
    assert {p.stem for p in KUBERAY.glob("*.yaml")} == {p.stem for p in CONFIGS} | companions


def test_render_is_deterministic_and_check_mode_reports_drift(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    result = runner.invoke(cli, ["k8s", "render", "--all", "--check"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = runner.invoke(
        cli, ["k8s", "render", "serve_configs/opt125m.yaml", "--out-dir", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "opt125m.yaml").read_text() == (KUBERAY / "opt125m.yaml").read_text()
    (out / "opt125m.yaml").write_text("stale\n")
    result = runner.invoke(
        cli, ["k8s", "render", "serve_configs/opt125m.yaml", "--out-dir", str(out), "--check"]
    )
    assert result.exit_code == 1 and "out of date" in result.output


@needs_crds
@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_offline(manifest):
    assert file_errors(manifest, CRDS) == []
    kinds = [d["kind"] for d in _docs(manifest)]
    assert "RayService" in kinds and "Service" in kinds and "PodMonitor" in kinds


@needs_crds
def test_crd_schema_check_is_strict_about_unknown_and_wrong_fields():
    rayservice = _by_kind(_docs(KUBERAY / "opt125m.yaml"))["RayService"]
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}  # typo
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = document_errors(bad, CRDS)
    assert any("rayStartParam" in e for e in errors), errors
    assert any("maxReplicas" in e and "'four'" in e for e in errors), errors
    assert ("ray.io/v1", "RayService") in crd_schemas(str(CRDS))


def test_core_kinds_are_checked_against_kubernetes_schemas():
    service = _by_kind(_docs(KUBERAY / "opt125m.yaml"))["Service"]
    assert document_errors(service, None) == []
    bad = copy.deepcopy(service)
    bad["spec"]["ports"][0]["port"] = "eighty"
    assert any("eighty" in e for e in document_errors(bad, None))
    bad = copy.deepcopy(service)
    bad["spec"]["selectr"] = {}
    assert document_errors(bad, None)


def test_serve_config_v2_is_the_serve_config_with_http_on_all_interfaces():
    for config in CONFIGS:
        rayservice = _by_kind(_docs(KUBERAY / f"{config.stem}.yaml"))["RayService"]
        embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        original = read_serve_config(config).raw
        assert embedded["http_options"]["host"] == "0.0.0.0"
        assert embedded["applications"] == original["applications"]
        for app in embedded["applications"]:
            load_config(app["args"])


def test_serve_config_v2_problems_are_reported():
    rayservice = _by_kind(_docs(KUBERAY / "opt125m.yaml"))["RayService"]
    bad = copy.deepcopy(rayservice)
    serve = yaml.safe_load(bad["spec"]["serveConfigV2"])
    serve["applications"][0]["args"]["models"][0]["dtype"] = "float8"
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    (error,) = document_errors(bad, None)
    assert "models.0.dtype" in error and "float8" in error
    serve["applications"][0]["args"]["models"][0]["dtype"] = "auto"
    serve["http_options"]["host"] = "127.0.0.1"
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(serve)
    assert "0.0.0.0" in document_errors(bad, None)[0]


def test_minimal_example_is_production_stacks():
    docs = _by_kind(_docs(KUBERAY / "opt125m.yaml"))
    rayservice, router, pvc = docs["RayService"], docs["Service"], docs["PersistentVolumeClaim"]
    assert rayservice["metadata"]["name"] == "vllm"
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu-")]
    assert len(gpu) == 1 and gpu[0]["replicas"] == 1
    container = gpu[0]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "6", "memory": "16Gi", "nvidia.com/gpu": 1}
    assert parse_quantity(pvc["spec"]["resources"]["requests"]["storage"]) == 10 * 2**30
    volumes = {v["name"]: v for v in gpu[0]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["model-cache"] == env["HF_HOME"]["value"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
        "optional": True,
    }
    # `kubectl port-forward svc/vllm-router-service 30080:80` reaches the Serve proxy
    assert router["metadata"]["name"] == "vllm-router-service"
    assert router["spec"]["ports"][0]["port"] == 80
    assert router["spec"]["ports"][0]["targetPort"] == 8000
    assert router["spec"]["selector"]["app.kubernetes.io/instance"] == "vllm"
    assert cluster["enableInTreeAutoscaling"] is False


def test_autoscaling_example_enables_serve_and_ray_autoscaling():
    docs = _by_kind(_docs(KUBERAY / "opt125m-autoscaling.yaml"))
    rayservice = docs["RayService"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu-")]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    scaling = serve["applications"][0]["args"]["models"][0]["autoscaling"]
    assert scaling["max_replicas"] == 4
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_configs_get_cpu_workers_and_no_init_containers():
    cluster = _by_kind(_docs(KUBERAY / "multi-model.yaml"))["RayService"]["spec"][
        "rayClusterConfig"
    ]
    groups = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert groups == ["cpu-smollm2", "cpu-smollm2-embed", "ingress"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in limits
        # engine replicas convert embedded models themselves (EngineServer)
        assert "initContainers" not in spec


def _pods(manifest: Path) -> dict[str, dict]:
    cluster = _by_kind(_docs(manifest))["RayService"]["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_only_engine_pods_mount_the_model_cache(manifest):
    """An RWO claim cannot follow pods onto several nodes: head and ingress do not mount it."""
    cache_paths = set()
    for group, spec in _pods(manifest).items():
        assert "initContainers" not in spec
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        cache_paths.add(env["VRSTACK_CACHE"])
        volumes = {v["name"] for v in spec.get("volumes", [])}
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        if group in ("head", "ingress"):
            assert "model-cache" not in volumes and "model-cache" not in mounts, group
            assert "HF_HOME" not in env and "HF_TOKEN" not in env, group
        else:
            assert "model-cache" in volumes and mounts["model-cache"] == env["HF_HOME"]
            assert env["VRSTACK_CACHE"].startswith(env["HF_HOME"] + "/")
            assert spec["securityContext"]["fsGroup"] == 100
    # the Serve build (on any pod) and the engine replicas must agree on the model folder
    assert len(cache_paths) == 1


def test_model_cache_access_mode_follows_the_number_of_engine_pods(tmp_path):
    raw = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw

    def access_modes(*models: dict) -> list[str]:
        config = copy.deepcopy(raw)
        config["applications"][0]["args"]["models"] = list(models)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        docs = _by_kind(render_documents(read_serve_config(path), RenderOptions(name="x")))
        return docs["PersistentVolumeClaim"]["spec"]["accessModes"]

    (opt,) = raw["applications"][0]["args"]["models"]
    other = {**opt, "name": "other", "aliases": []}
    assert access_modes(opt) == ["ReadWriteOnce"]  # one engine pod
    assert access_modes({**opt, "replicas": 2}) == ["ReadWriteMany"]
    assert access_modes(opt, other) == ["ReadWriteMany"]  # two worker groups
    autoscaling = _by_kind(_docs(KUBERAY / "opt125m-autoscaling.yaml"))  # max_replicas 4
    assert autoscaling["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_every_image_has_a_documented_build():
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    images = {
        c["image"]
        for manifest in STACK_MANIFESTS
        for spec in _pods(manifest).values()
        for c in spec["containers"]
    }
    assert images == set(DOCKERFILES)
    for image, dockerfile in DOCKERFILES.items():
        assert f"docker build -f {dockerfile} -t {image} ." in docs, image
        text = (ROOT / dockerfile).read_text()
        base = GPU_BASE_IMAGE if image == GPU_IMAGE else CPU_BASE_IMAGE
        assert f"ARG BASE_IMAGE={base}\n" in text, dockerfile
        assert f"docker build -f {dockerfile} -t {image} ." in text, dockerfile


def test_upgrade_strategy_none_and_working_dir(tmp_path):
    loaded = read_serve_config(SERVE_CONFIGS / "opt125m.yaml")
    options = RenderOptions(
        name="opt", upgrade_strategy="None", working_dir="https://example.com/vrstack.zip"
    )
    docs = _by_kind(render_documents(loaded, options))
    spec = docs["RayService"]["spec"]
    assert spec["upgradeStrategy"] == {"type": "None"}
    serve = yaml.safe_load(spec["serveConfigV2"])
    assert serve["applications"][0]["runtime_env"]["working_dir"].endswith("vrstack.zip")
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == GPU_BASE_IMAGE
    for document in docs.values():
        assert document_errors(document, CRDS if CRDS.is_dir() else None) == []


def test_names_that_do_not_fit_are_refused():
    loaded = read_serve_config(SERVE_CONFIGS / "opt125m.yaml")
    with pytest.raises(ValueError, match="at most 47"):
        render_documents(loaded, RenderOptions(name="x" * 48))
    with pytest.raises(ValueError, match="not a valid RayService name"):
        render_documents(loaded, RenderOptions(name="Bad_Name"))
    assert default_name("serve_configs/My Config.yaml") == "my-config"
    assert default_name("serve_configs/opt125m.yaml") == "vllm"
    rayservice = _by_kind(_docs(KUBERAY / "opt125m.yaml"))["RayService"]
    bad = copy.deepcopy(rayservice)
    bad["metadata"]["name"] = "a" * 50
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["memory"] = "16 GB"
    errors = document_errors(bad, None)
    assert any("at most 47" in e for e in errors)
    assert any("'16 GB'" in e for e in errors)
