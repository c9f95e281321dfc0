"""The default manifests carry this package: a deterministic sdist in a content-addressed
ConfigMap, mounted by every pod at the path the runtime_env's pip requirement names, and
installable by pip from there. Renders with --image, --package or --working-dir carry none."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from app.k8s.images import PACKAGE_MOUNT
from app.k8s.options import RenderOptions
from app.k8s.package import (
    MAX_BASE64_BYTES,
    NOT_SERVED,
    NOT_SERVED_MODULES,
    SERVED_ANYWAY,
    SOURCE_EPOCH,
    archive_name,
    build_sdist,
    sdist,
    source_root,
)
from app.k8s.render import output_path, package_configmap, render_documents
from app.k8s.validate import document_errors
from app.serve_config import read_serve_config
from tests.conftest import ROOT, SERVE_CONFIGS
from tests.test_k8s_client import kube, run  # noqa: F401  (the Kubernetes API test double)

pytestmark = pytest.mark.timeout(120)
CONFIGS = sorted(SERVE_CONFIGS.glob("*.yaml"))
MANIFESTS = [output_path(c, ROOT / "kuberay") for c in CONFIGS]
ANNOTATION_LIMIT = 256 * 1024  # metadata.annotations in all (kubectl's last-applied copy)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pods(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return pods


def _requirements(rayservice: dict) -> list[str]:
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return [app["runtime_env"]["pip"]["packages"][0] for app in serve["applications"]]


def _copy_sources(target: Path) -> Path:
    """The files the sdist takes, copied elsewhere with other times and modes."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "app", target / "app", ignore=shutil.ignore_patterns("*.pyc"))
    (target / "app" / "__pycache__").mkdir(exist_ok=True)
    (target / "app" / "__pycache__" / "stray.py").write_text("raise SystemExit('cached')\n")
    for path in target.rglob("*"):
        os.utime(path, (1_800_000_000, 1_800_000_000))
        if path.is_file():
            path.chmod(0o600)
    return target


def test_the_sdist_is_the_same_bytes_on_every_build_and_machine(tmp_path):
    data, digest = sdist()
    assert build_sdist(source_root()) == data == build_sdist(_copy_sources(tmp_path / "elsewhere"))
    assert len(digest) == 64 and int(digest, 16) >= 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        members = tar.getmembers()
    top = archive_name().removesuffix(".tar.xz")
    assert top == "vllm_ray_stack-0.1.0"
    names = [m.name for m in members]
    assert names[0] == top and all(n.startswith(top + "/") for n in names[1:])
    files = {n.removeprefix(top + "/") for n, m in zip(names, members, strict=True) if m.isfile()}
    expected = {"pyproject.toml", "README.md"} | {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "app").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    folders = {
        f for f in expected
        if f.startswith("app/") and f.split("/")[1] in NOT_SERVED
        and f.removeprefix("app/") not in SERVED_ANYWAY
    }  # fmt: skip
    modules = {f"app/{m}" for m in NOT_SERVED_MODULES}
    assert modules <= expected  # (each still exists)
    assert files == expected - folders - modules and "app/ingress/asgi.py" in files
    assert "app/lab/trace.py" in files and "app/lab/simulator.py" not in files
    assert "app/observability/metrics.py" in files and "app/launcher.py" not in files
    assert {f.split("/")[1] for f in folders} == set(NOT_SERVED)
    assert all(
        (m.mtime, m.uid, m.gid, m.uname, m.gname) == (SOURCE_EPOCH, 0, 0, "", "") for m in members
    )
    assert {m.mode for m in members if m.isfile()} == {0o644}
    assert {m.mode for m in members if m.isdir()} == {0o755}


def test_the_archive_in_the_rendered_manifest_installs_with_pip(tmp_path):
    """pip installs the rendered kuberay/opt125m.yaml's archive through the runtime_env's own
    requirement (its mount path pointed at a copy), and the serving path (what the serve
    config's import path, Ray's workers and a user's handle calls import) then imports from
    the install, without the parts the archive leaves out."""
    docs = _docs(ROOT / "kuberay" / "opt125m.yaml")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
    ((name, text),) = configmap["binaryData"].items()
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / name).write_bytes(base64.b64decode(text))
    (requirement,) = _requirements(rayservice)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--disable-pip-version-check", "--target", str(target),
         requirement.replace(PACKAGE_MOUNT, str(mount))],
        check=True, capture_output=True, timeout=90,
    )  # fmt: skip
    probe = (
        "import app, app.builder, app.client, app.ingress.deployment, app.engines.llm_server, "
        "app.engines.router, app.tenants.ledger, app.capture, app.batches, json; "
        "print(json.dumps([app.__file__, app.__version__]))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    where, version = json.loads(found.stdout.splitlines()[-1])  # after vLLM's import logs
    assert Path(where).resolve().is_relative_to(target.resolve()), where
    assert version == "0.1.0"
    assert (target / "vllm_ray_stack-0.1.0.dist-info").is_dir()


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_mounts_the_package_where_pip_looks(manifest):
    docs = _docs(manifest)
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
    assert [d["kind"] for d in docs].index("ConfigMap") < [d["kind"] for d in docs].index(
        "RayService"
    )  # kubectl apply -f creates it before the pods that mount it
    data, digest = sdist()
    name = rayservice["metadata"]["name"]
    assert configmap["metadata"]["name"] == f"{name}-package-{digest[:10]}"
    assert configmap["metadata"]["labels"] == {
        **rayservice["metadata"]["labels"],
        "app.kubernetes.io/component": "package",
    }
    assert configmap["binaryData"] == {archive_name(): base64.b64encode(data).decode()}
    assert document_errors(configmap, None) == []
    paths = set()
    for requirement in _requirements(rayservice):
        distribution, url = requirement.split(" @ ")
        assert distribution in ("vllm-ray-stack", "vllm-ray-stack[cpu]")
        assert url.startswith("file:///")
        paths.add(url.removeprefix("file://"))
    (path,) = paths
    folder, file = path.rsplit("/", 1)
    assert file in configmap["binaryData"]
    for group, spec in _pods(rayservice).items():
        volumes = [v for v in spec["volumes"] if "configMap" in v]
        volume = {"name": "vrstack-package", "configMap": {"name": configmap["metadata"]["name"]}}
        assert volumes == [volume], group
        for container in spec["containers"]:
            mounts = [m for m in container["volumeMounts"] if m["name"] == "vrstack-package"]
            assert mounts == [{"name": "vrstack-package", "mountPath": folder, "readOnly": True}], (
                group
            )


@pytest.mark.parametrize(
    "choice",
    [
        {"image": "registry.example.com/vllm-ray-stack:0.1.0-cu130"},
        {"package": "https://files.example.com/vllm_ray_stack-0.1.0-py3-none-any.whl"},
        {"working_dir": "https://files.example.com/vllm-ray-stack.zip"},
    ],
    ids=lambda c: next(iter(c)),
)
@pytest.mark.parametrize("config", ["opt125m.yaml", "smollm2-cpu.yaml"])
def test_image_package_and_working_dir_renders_carry_no_package(config, choice):
    loaded = read_serve_config(SERVE_CONFIGS / config)
    docs = render_documents(loaded, RenderOptions(name="x", **choice))
    assert "ConfigMap" not in [d["kind"] for d in docs]
    text = yaml.safe_dump(docs)
    assert "vrstack-package" not in text and PACKAGE_MOUNT not in text
    default = yaml.safe_dump(render_documents(loaded, RenderOptions(name="x")))
    assert "vrstack-package" in default and PACKAGE_MOUNT in default


def test_a_package_too_large_for_kubectl_apply_is_refused_with_the_alternatives():
    data, _ = sdist()
    size = len(base64.b64encode(data))
    assert size <= MAX_BASE64_BYTES
    configmap = package_configmap("vllm", {}, limit=size)  # exactly at the limit: fine
    # room for the rest of the object in kubectl's last-applied-configuration annotation
    assert len(json.dumps(configmap)) + 16 * 1024 < ANNOTATION_LIMIT
    assert MAX_BASE64_BYTES + 16 * 1024 < ANNOTATION_LIMIT
    with pytest.raises(ValueError) as refused:
        package_configmap("vllm", {}, limit=size - 1)
    message = str(refused.value)
    assert f"{size} bytes" in message and f"{size - 1} bytes" in message
    assert "--image" in message and "--package" in message


def test_delete_removes_every_package_configmap_of_the_stack(kube):  # noqa: F811
    manifest = str(ROOT / "kuberay" / "opt125m.yaml")
    code, out = run("apply", manifest, "--kubeconfig", kube.kubeconfig)
    assert code == 0 and "configmap/vllm-package-" in out and " created" in out, out
    code, out = run("apply", manifest, "--kubeconfig", kube.kubeconfig)
    assert code == 0 and "unchanged" in out, out
    labels = {"app.kubernetes.io/instance": "vllm", "app.kubernetes.io/component": "package"}
    older = {"metadata": {"name": "vllm-package-0123456789", "labels": labels}}
    other = {"metadata": {"name": "other-package-0123456789", "labels": {**labels}}}
    other["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
    kube.objects[("llm", "configmaps", "vllm-package-0123456789")] = older
    kube.objects[("llm", "configmaps", "other-package-0123456789")] = other
    code, out = run("delete", "vllm", "--kubeconfig", kube.kubeconfig)
    assert code == 0, out
    assert "configmap/vllm-package-0123456789 deleted" in out
    assert sorted(kube.objects) == [
        ("llm", "configmaps", "other-package-0123456789"),
        ("llm", "persistentvolumeclaims", "vllm-model-cache"),
    ]
