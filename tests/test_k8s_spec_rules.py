"""KubeRay's spec rules in offline validation (what KubeRay v1.7.0's controller refuses although
the CRD schema accepts it, ray-operator/controllers/ray/utils/validation.go), and the
NewClusterWithIncrementalUpgrade render option."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.k8s.options import INCREMENTAL_UPGRADE, ClusterUpgradeOptions, RenderOptions
from app.k8s.render import render_documents
from app.k8s.spec_rules import CRD_DEFAULTS, generic_version, go_duration_seconds
from app.k8s.validate import _schema_errors, crd_schemas, document_errors, file_errors
from app.serve_config import read_serve_config
from tests.conftest import ROOT, SERVE_CONFIGS

KUBERAY = ROOT / "kuberay"
CRDS = Path("/work/shared/kuberay/crds")
needs_crds = pytest.mark.skipif(
    not (CRDS / "ray.io_rayservices.yaml").is_file(),
    reason=f"KubeRay CRD schemas not found in {CRDS} (test data kept outside the project)",
)
AUTOSCALING = SERVE_CONFIGS / "opt125m-autoscaling.yaml"
FIXED = SERVE_CONFIGS / "opt125m.yaml"
MANIFESTS = sorted(KUBERAY.rglob("*.yaml"))


def _rayservice(config: Path = AUTOSCALING, **options: Any) -> dict[str, Any]:
    documents = render_documents(read_serve_config(config), RenderOptions(name="rules", **options))
    return next(d for d in documents if d["kind"] == "RayService")


def _raycluster() -> dict[str, Any]:
    """The RayCluster KubeRay would make of the rendered RayService."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "rules-abcde"},
        "spec": copy.deepcopy(_rayservice()["spec"]["rayClusterConfig"]),
    }


def _schema_only(document: dict[str, Any]) -> list[str]:
    return _schema_errors(document, crd_schemas(str(CRDS))[("ray.io/v1", document["kind"])])


# --- every checked-in manifest passes ------------------------------------------------------


def test_checked_in_manifests_are_found():
    assert any(p.parent == KUBERAY for p in MANIFESTS)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBERAY)))
def test_every_checked_in_manifest_passes_the_spec_rules(manifest):
    assert file_errors(manifest, None) == []


@needs_crds
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(KUBERAY)))
def test_every_checked_in_manifest_passes_schema_and_spec_rules(manifest):
    assert file_errors(manifest, CRDS) == []


# --- the two holes the issue names ----------------------------------------------------------


@needs_crds
def test_bogus_upgrade_strategy_passes_the_schema_but_is_refused():
    rayservice = _rayservice()
    rayservice["spec"]["upgradeStrategy"]["type"] = "Bogus"
    assert _schema_only(rayservice) == []  # the CRD has no enum for it
    errors = document_errors(rayservice, CRDS)
    assert any(e.startswith("spec.upgradeStrategy.type") and "'Bogus'" in e for e in errors)
    assert all(s in errors[0] for s in ("NewCluster", "None", INCREMENTAL_UPGRADE)), errors


@needs_crds
def test_min_replicas_above_max_replicas_passes_the_schema_but_is_refused():
    rayservice = _rayservice()
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][-1]
    group["minReplicas"] = group["maxReplicas"] + 1
    assert _schema_only(rayservice) == []
    (error,) = document_errors(rayservice, CRDS)
    assert "minReplicas" in error and f"greater than maxReplicas {group['maxReplicas']}" in error


# --- every other rule -----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], Any]


def _cluster(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["rayClusterConfig"]


def _head(d: dict[str, Any]) -> dict[str, Any]:
    return _cluster(d)["headGroupSpec"]


def _worker(d: dict[str, Any]) -> dict[str, Any]:
    return _cluster(d)["workerGroupSpecs"][-1]


def _head_env(d: dict[str, Any], name: str, value: str = "1") -> None:
    _head(d)["template"]["spec"]["containers"][0]["env"].append({"name": name, "value": value})


def _annotate(d: dict[str, Any], key: str, value: str) -> None:
    d["metadata"].setdefault("annotations", {})[key] = value


def _set(path: str, value: Any) -> Mutation:
    """Set a dotted path under the RayService spec (creating maps on the way)."""

    def mutate(d: dict[str, Any]) -> None:
        node = d["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value

    return mutate


def _incremental(**options: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        d["spec"]["upgradeStrategy"] = {"type": INCREMENTAL_UPGRADE}
        if options:
            d["spec"]["upgradeStrategy"]["clusterUpgradeOptions"] = options

    return mutate


GOOD_UPGRADE = {"gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 60}
V2 = _set("rayClusterConfig.autoscalerOptions.version", "v2")
GCS = _set("rayClusterConfig.gcsFaultToleranceOptions", {"redisAddress": "redis:6379"})
ROCKSDB = {"backend": "rocksdb"}

REFUSED: dict[str, tuple[list[Mutation], str]] = {
    "negative minReplicas": ([lambda d: _worker(d).update(minReplicas=-1)], "negative minReplicas"),
    "negative maxReplicas": (
        [lambda d: _worker(d).update(minReplicas=0, maxReplicas=-1)],
        "negative maxReplicas",
    ),
    "negative deletion delay": (
        [_set("rayClusterDeletionDelaySeconds", -1)],
        "rayClusterDeletionDelaySeconds",
    ),
    "head service name": (
        [_set("rayClusterConfig.headGroupSpec.headService.metadata.name", "mine")],
        "headService.metadata.name",
    ),
    "initializing timeout not a duration": (
        [lambda d: _annotate(d, "ray.io/initializing-timeout", "soon")],
        "ray.io/initializing-timeout",
    ),
    "initializing timeout not positive": (
        [lambda d: _annotate(d, "ray.io/initializing-timeout", "-5m")],
        "not a positive duration",
    ),
    "k8s token auth on a RayService": (
        [_set("rayClusterConfig.authOptions", {"mode": "token", "enableK8sTokenAuth": True})],
        "not supported for RayService",
    ),
    "token auth on an old Ray": (
        [
            _set("rayClusterConfig.authOptions", {"mode": "token"}),
            _set("rayClusterConfig.rayVersion", "2.51.0"),
        ],
        "2.52.0",
    ),
    "k8s token auth without token mode": (
        [_set("rayClusterConfig.authOptions", {"enableK8sTokenAuth": True})],
        "needs authOptions.mode: token",
    ),
    "head without containers": (
        [lambda d: _head(d)["template"]["spec"].update(containers=[])],
        "headGroupSpec.template.spec.containers",
    ),
    "worker without containers": (
        [lambda d: _worker(d)["template"]["spec"].update(containers=[])],
        "needs at least one container",
    ),
    "resources in two places": (
        [lambda d: _head(d).update(resources={"CPU": "0"})],
        "use only one of the two",
    ),
    "rayStartParams labels": (
        [lambda d: _worker(d)["rayStartParams"].update(labels="a=b")],
        "rayStartParams.labels",
    ),
    "bad group label key": (
        [lambda d: _worker(d).update(labels={"not a key": "x"})],
        "is not a label key",
    ),
    "bad group label value": (
        [lambda d: _worker(d).update(labels={"zone": "x" * 64})],
        "is not a label value",
    ),
    "idle timeout without autoscaler v2": (
        [lambda d: _worker(d).update(idleTimeoutSeconds=30)],
        "idleTimeoutSeconds: needs autoscaler v2",
    ),
    "negative idle timeout": (
        [V2, lambda d: _worker(d).update(idleTimeoutSeconds=-1)],
        "must not be negative",
    ),
    "priority without autoscaler v2": (
        [lambda d: _worker(d).update(priority=1)],
        "priority: needs autoscaler v2",
    ),
    "priority on an old Ray": (
        [V2, lambda d: _worker(d).update(priority=1), _set("rayClusterConfig.rayVersion", "2.55")],
        "2.56.0",
    ),
    "suspended group with autoscaling": (
        [lambda d: _worker(d).update(suspend=True)],
        "cannot be suspended",
    ),
    "restart policy with autoscaler v2 (head)": (
        [V2, lambda d: _head(d)["template"]["spec"].update(restartPolicy="Always")],
        "headGroupSpec.template.spec.restartPolicy",
    ),
    "restart policy with autoscaler v2 (worker)": (
        [V2, lambda d: _worker(d)["template"]["spec"].update(restartPolicy="OnFailure")],
        "restartPolicy: must be Never",
    ),
    "autoscaler v2 env without autoscaling": (
        [
            _set("rayClusterConfig.enableInTreeAutoscaling", False),
            lambda d: _head_env(d, "RAY_enable_autoscaler_v2", "true"),
        ],
        "needs enableInTreeAutoscaling: true",
    ),
    "autoscaler version twice": (
        [V2, lambda d: _head_env(d, "RAY_enable_autoscaler_v2")],
        "keep only autoscalerOptions.version",
    ),
    "negative autoscaler idle timeout": (
        [_set("rayClusterConfig.autoscalerOptions.idleTimeoutSeconds", -1)],
        "autoscalerOptions.idleTimeoutSeconds",
    ),
    "autoscaler start command env": (
        [
            _set(
                "rayClusterConfig.autoscalerOptions.env",
                [{"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "x"}],
            )
        ],
        "KUBERAY_GEN_AUTOSCALER_START_CMD is set by KubeRay",
    ),
    "redis address implies fault tolerance": (
        [lambda d: _head_env(d, "RAY_REDIS_ADDRESS", "redis:6379")],
        "turns GCS fault tolerance on implicitly",
    ),
    "ft annotation and options": (
        [GCS, lambda d: _annotate(d, "ray.io/ft-enabled", "true")],
        "ray.io/ft-enabled]: not allowed",
    ),
    "redis password in rayStartParams": (
        [GCS, lambda d: _head(d)["rayStartParams"].update({"redis-password": "x"})],
        "redis-password: not allowed",
    ),
    "redis username in rayStartParams": (
        [lambda d: _head(d)["rayStartParams"].update({"redis-username": "x"})],
        "redisUsername",
    ),
    "rocksdb with a redis address": (
        [_set("rayClusterConfig.gcsFaultToleranceOptions", {**ROCKSDB, "redisAddress": "r:1"})],
        "redisAddress: not allowed with backend rocksdb",
    ),
    "rocksdb claim with a size": (
        [
            _set(
                "rayClusterConfig.gcsFaultToleranceOptions",
                {**ROCKSDB, "storage": {"claimName": "gcs", "size": "1Gi"}},
            )
        ],
        "claimName: excludes size",
    ),
    "storage with redis": (
        [_set("rayClusterConfig.gcsFaultToleranceOptions", {"storage": {"size": "1Gi"}})],
        "storage: only for backend rocksdb",
    ),
    "history server without collector": (
        [_set("rayClusterConfig.historyServerOptions", {})],
        "collectorOptions: required",
    ),
    "history collector without its backend's env": (
        [
            _set(
                "rayClusterConfig.historyServerOptions.collectorOptions",
                {"image": "c", "env": [{"name": "STORAGE_BACKEND", "value": "s3"}]},
            )
        ],
        "STORAGE_BACKEND s3 needs S3_REGION",
    ),
    "history collector container name": (
        [
            _set("rayClusterConfig.historyServerOptions.collectorOptions", {"image": "c"}),
            lambda d: _worker(d)["template"]["spec"]["containers"][0].update(
                name="ray-history-collector"
            ),
        ],
        "ray-history-collector is KubeRay's own",
    ),
    "network policy rules against its mode": (
        [
            _set(
                "rayClusterConfig.networkPolicy",
                {"mode": "DenyAllEgress", "head": {"ingressRules": [{}]}},
            )
        ],
        "networkPolicy.head.ingressRules: cannot be set with mode DenyAllEgress",
    ),
    "network policy for a missing group": (
        [_set("rayClusterConfig.networkPolicy", {"workerGroups": [{"groupName": "nope"}]})],
        "names no group of workerGroupSpecs",
    ),
    "tls env set by hand": (
        [
            _set("rayClusterConfig.tlsOptions", {"enabled": True}),
            lambda d: _head_env(d, "RAY_USE_TLS"),
        ],
        "RAY_USE_TLS is set by KubeRay",
    ),
    "duplicate group names": (
        [lambda d: _cluster(d)["workerGroupSpecs"].append(copy.deepcopy(_worker(d)))],
        "is used by another worker group",
    ),
    "no serve port": (
        [
            lambda d: d["spec"].pop("serveService", None),
            lambda d: [
                p.update(name="http")
                for p in _head(d)["template"]["spec"]["containers"][0]["ports"]
                if p["name"] == "serve"
            ],
        ],
        "no port named 'serve'",
    ),
    "incremental without options": ([_incremental()], "clusterUpgradeOptions: required"),
    "incremental without autoscaling": (
        [_incremental(**GOOD_UPGRADE), _set("rayClusterConfig.enableInTreeAutoscaling", False)],
        "needs the Ray autoscaler",
    ),
    "incremental without gateway class": (
        [_incremental(**{**GOOD_UPGRADE, "gatewayClassName": ""})],
        "gatewayClassName: required",
    ),
    "incremental surge above 100": (
        [_incremental(**GOOD_UPGRADE, maxSurgePercent=101)],
        "maxSurgePercent: must be between 0 and 100",
    ),
    "incremental step above surge": (
        [_incremental(**{**GOOD_UPGRADE, "stepSizePercent": 30}, maxSurgePercent=20)],
        "is more than maxSurgePercent 20",
    ),
    "incremental zero interval": (
        [_incremental(**{**GOOD_UPGRADE, "intervalSeconds": 0})],
        "intervalSeconds: must be more than 0",
    ),
    "incremental with a serveService": (
        [_incremental(**GOOD_UPGRADE), _set("serveService", {"metadata": {"name": "x"}})],
        "KubeRay ignores it",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_each_rule_refuses_what_kuberay_refuses(case):
    mutations, expected = REFUSED[case]
    rayservice = _rayservice()
    assert document_errors(rayservice, None) == []
    for mutate in mutations:
        mutate(rayservice)
    errors = document_errors(rayservice, None)
    assert any(expected in e for e in errors), errors


ACCEPTED: dict[str, list[Mutation]] = {
    "initializing timeout as a duration": [
        lambda d: _annotate(d, "ray.io/initializing-timeout", "1h30m")
    ],
    "initializing timeout in seconds": [
        lambda d: _annotate(d, "ray.io/initializing-timeout", "600")
    ],
    "token auth on a recent Ray": [_set("rayClusterConfig.authOptions", {"mode": "token"})],
    "idle timeout and priority with autoscaler v2": [
        V2,
        lambda d: _worker(d).update(idleTimeoutSeconds=30, priority=2),
    ],
    "fault tolerance by options": [GCS],
    "prefixed group label": [lambda d: _worker(d).update(labels={"example.com/zone": "a-1"})],
    "incremental with its options": [_incremental(**GOOD_UPGRADE), _set("serveService", None)],
}


@pytest.mark.parametrize("case", ACCEPTED, ids=str)
def test_what_kuberay_accepts_stays_accepted(case):
    rayservice = _rayservice()
    for mutate in ACCEPTED[case]:
        mutate(rayservice)
    if rayservice["spec"].get("serveService", {}) is None:
        del rayservice["spec"]["serveService"]
    assert document_errors(rayservice, None) == []


@needs_crds
def test_a_raycluster_gets_the_cluster_rules_and_its_own():
    cluster = _raycluster()
    assert document_errors(cluster, CRDS) == []
    made_by_service = copy.deepcopy(cluster)
    made_by_service["metadata"]["labels"] = {"ray.io/originated-from-crd": "RayService"}
    made_by_service["spec"]["upgradeStrategy"] = {"type": "Recreate"}
    assert any("made by a RayService" in e for e in document_errors(made_by_service, CRDS))
    long_name = copy.deepcopy(cluster)
    long_name["metadata"]["name"] = "r" * 54
    assert any("at most 53" in e for e in document_errors(long_name, None))
    bad_group = copy.deepcopy(cluster)
    bad_group["spec"]["workerGroupSpecs"][-1]["minReplicas"] = 99
    assert any(e.startswith("spec.workerGroupSpecs[") for e in document_errors(bad_group, None))


@needs_crds
def test_crd_defaults_the_rules_read_are_the_crds():
    crd = yaml.safe_load((CRDS / "ray.io_rayservices.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    group = spec["properties"]["rayClusterConfig"]["properties"]["workerGroupSpecs"]["items"]
    upgrade = spec["properties"]["upgradeStrategy"]["properties"]["clusterUpgradeOptions"]
    assert {
        "minReplicas": group["properties"]["minReplicas"]["default"],
        "maxReplicas": group["properties"]["maxReplicas"]["default"],
        "maxSurgePercent": upgrade["properties"]["maxSurgePercent"]["default"],
    } == CRD_DEFAULTS


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("0", 0), ("-5m", -300), ("250ms", 0.25)],
)
def test_go_durations_parse_like_go(text, seconds):
    assert go_duration_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "5m3", "5 m", "1d"])
def test_what_go_refuses_as_a_duration_is_none(text):
    assert go_duration_seconds(text) is None


def test_versions_parse_like_kubernetes_parse_generic():
    assert generic_version("2.60.0") == (2, 60, 0)
    assert generic_version("v2.56") == (2, 56)
    assert generic_version("2.60.0rc1") == (2, 60, 0)
    assert generic_version("2") is None and generic_version("02.1") is None


# --- NewClusterWithIncrementalUpgrade as a render option -----------------------------------

INCREMENTAL = ["--upgrade-strategy", INCREMENTAL_UPGRADE]


def _render(*args: str) -> Any:
    return CliRunner().invoke(cli, ["k8s", "render", *args, "--stdout"])


def _rendered_rayservice(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayService")


@needs_crds
def test_incremental_render_passes_the_crd_and_the_spec_rules():
    result = _render(str(AUTOSCALING), *INCREMENTAL, "--gateway-class", "istio")
    rayservice = _rendered_rayservice(result)
    assert document_errors(rayservice, CRDS) == []
    default = _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    largest = max(group["maxReplicas"] for group in default)
    assert rayservice["spec"]["upgradeStrategy"] == {
        "type": INCREMENTAL_UPGRADE,
        "clusterUpgradeOptions": {
            "gatewayClassName": "istio",
            "maxSurgePercent": 100 // largest,  # one pod of the largest group per step
            "stepSizePercent": 100 // largest,
            "intervalSeconds": 60,
        },
    }
    # traffic enters through KubeRay's Gateway, which ignores a custom serve Service
    assert "serveService" not in rayservice["spec"]


def test_incremental_cluster_starts_empty_and_keeps_its_maximums():
    rendered = _rayservice(
        upgrade_strategy=INCREMENTAL_UPGRADE,
        cluster_upgrade=ClusterUpgradeOptions(gateway_class_name="istio"),
    )
    default = _rayservice()
    groups = rendered["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [(g["replicas"], g["minReplicas"]) for g in groups] == [(0, 0)] * len(groups)
    default_groups = default["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["maxReplicas"] for g in groups] == [g["maxReplicas"] for g in default_groups]
    assert any(g["minReplicas"] > 0 for g in default_groups)  # what incremental changes


def test_incremental_render_takes_the_crds_options():
    result = _render(
        str(AUTOSCALING),
        *INCREMENTAL,
        "--gateway-class",
        "eg",
        "--max-surge-percent",
        "20",
        "--step-size-percent",
        "10",
        "--interval-seconds",
        "30",
    )
    options = _rendered_rayservice(result)["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert options == {
        "gatewayClassName": "eg",
        "maxSurgePercent": 20,
        "stepSizePercent": 10,
        "intervalSeconds": 30,
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([str(FIXED), *INCREMENTAL, "--gateway-class", "istio"], "`autoscaling` section"),
        ([str(AUTOSCALING), *INCREMENTAL], "--gateway-class NAME"),
        (
            [str(AUTOSCALING), *INCREMENTAL, "--gateway-class", "x", "--step-size-percent", "50"],
            "lower the step or raise the surge",
        ),
        ([str(AUTOSCALING), "--gateway-class", "istio"], "only apply to --upgrade-strategy"),
        ([str(AUTOSCALING), "--upgrade-strategy", "Bogus"], INCREMENTAL_UPGRADE),
    ],
    ids=["no autoscaling", "no gateway class", "step above surge", "not incremental", "bogus"],
)
def test_render_refuses_what_incremental_upgrades_cannot_do(args, expected):
    result = _render(*args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output


def test_render_options_refuse_incremental_without_autoscaling():
    with pytest.raises(ValueError, match="autoscaling"):
        _rayservice(
            FIXED,
            upgrade_strategy=INCREMENTAL_UPGRADE,
            cluster_upgrade=ClusterUpgradeOptions(gateway_class_name="istio"),
        )
