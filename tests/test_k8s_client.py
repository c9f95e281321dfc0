"""`vrstack k8s apply|status|delete` with the official kubernetes client, against a local HTTP
test double of the Kubernetes REST API (a real server on 127.0.0.1 answering the paths the client
calls). No real cluster is involved: these tests check our requests and our messages."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import cli
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)
MANIFEST = ROOT / "kuberay" / "opt125m.yaml"
OBJECT = re.compile(r"^/(?:api/v1|apis/([^/]+)/([^/]+))/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?$")


class KubeDouble:
    """In-memory objects + switches for the failure modes (no KubeRay, forbidden)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.kuberay = True
        self.forbidden = False
        self.ready_after_gets = 2  # RayService GETs before status says Ready
        self.gets = 0


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def make_handler(state: KubeDouble):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: dict | str) -> None:
            data = body if isinstance(body, str) else json.dumps(body)
            self.send_response(code)
            self.send_header(
                "Content-Type",
                "application/json" if code != 404 or isinstance(body, dict) else "text/plain",
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _handle(self, method: str) -> None:
            path = self.path.split("?")[0]
            state.requests.append((method, path, self.headers.get("Content-Type", "")))
            if path == "/apis/ray.io/v1":
                if not state.kuberay:
                    return self._send(404, "404 page not found")
                return self._send(
                    200,
                    {
                        "kind": "APIResourceList",
                        "groupVersion": "ray.io/v1",
                        "resources": [
                            {
                                "name": "rayservices",
                                "namespaced": True,
                                "kind": "RayService",
                                "singularName": "rayservice",
                                "verbs": ["get", "create"],
                            }
                        ],
                    },
                )
            if path.startswith("/apis/") and path.count("/") == 3:
                return self._send(404, "404 page not found")  # e.g. no Prometheus operator
            match = OBJECT.match(path)
            if not match:
                return self._send(404, "404 page not found")
            group, _version, ns, plural, name = match.groups()
            if group == "ray.io" and not state.kuberay:
                return self._send(404, "404 page not found")
            if state.forbidden and method != "GET":
                return self._send(
                    403,
                    _status(
                        403,
                        "Forbidden",
                        f"{plural} is forbidden: User "
                        f'"dev" cannot {method.lower()} resource "{plural}" in namespace "{ns}"',
                    ),
                )
            key = (ns, plural, name or "")
            if method == "GET" and name is None:  # a list, by `key=value,...` label selector
                query = parse_qs(urlparse(self.path).query).get("labelSelector", [""])[0]
                wanted = dict(p.split("=", 1) for p in query.split(",") if p)
                items = [
                    obj
                    for (o_ns, o_plural, _), obj in state.objects.items()
                    if (o_ns, o_plural) == (ns, plural)
                    and wanted.items() <= obj["metadata"].get("labels", {}).items()
                ]
                return self._send(200, {"kind": "List", "apiVersion": "v1", "items": items})
            if method == "POST":
                body = self._body()
                key = (ns, plural, body["metadata"]["name"])
                if key in state.objects:
                    return self._send(409, _status(409, "AlreadyExists", "exists"))
                body["metadata"].update(namespace=ns, uid="u-1", resourceVersion="1")
                state.objects[key] = body
                return self._send(201, body)
            if key not in state.objects:
                return self._send(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
            if method == "GET":
                obj = state.objects[key]
                if plural == "rayservices":
                    state.gets += 1
                    ready = state.gets > state.ready_after_gets
                    obj["status"] = {
                        "conditions": [
                            {
                                "type": "Ready",
                                "status": "True" if ready else "False",
                                "reason": "RunningServeApps" if ready else "Initializing",
                                "message": "",
                                "lastTransitionTime": "2026-01-01T00:00:00Z",
                            }
                        ],
                        "activeServiceStatus": {
                            "applicationStatuses": {
                                "vrstack": {"status": "RUNNING" if ready else "DEPLOYING"}
                            }
                        },
                    }
                return self._send(200, obj)
            if method == "PATCH":
                patch = self._body()
                merged = {**state.objects[key], **patch}
                state.objects[key] = merged
                return self._send(200, merged)
            if method == "DELETE":
                obj = state.objects.pop(key)
                if group is None:  # core kinds answer with the deleted object
                    return self._send(200, {k: v for k, v in obj.items() if k != "status"})
                return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            return self._send(405, _status(405, "MethodNotAllowed", method))

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PATCH(self):
            self._handle("PATCH")

        def do_DELETE(self):
            self._handle("DELETE")

    return Handler


@pytest.fixture
def kube(tmp_path):
    """A Kubernetes API test double on 127.0.0.1 and a kubeconfig pointing at it."""
    state = KubeDouble()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "double",
                "clusters": [
                    {
                        "name": "double",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_port}"},
                    }
                ],
                "users": [{"name": "dev", "user": {"token": "test-token"}}],
                "contexts": [
                    {
                        "name": "double",
                        "context": {"cluster": "double", "user": "dev", "namespace": "llm"},
                    }
                ],
            }
        )
    )
    state.kubeconfig = str(kubeconfig)
    yield state
    server.shutdown()
    server.server_close()


def run(*args: str):
    result = CliRunner().invoke(cli, ["k8s", *args])
    return result.exit_code, result.output


def test_apply_creates_then_patches_against_kubernetes_api_test_double(kube):
    code, out = run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)
    assert code == 0, out
    assert "persistentvolumeclaim/vllm-model-cache created" in out
    assert "rayservice/vllm created" in out
    assert "router-service" not in out  # the router Service is the RayService's serveService
    rayservice = kube.objects[("llm", "rayservices", "vllm")]
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    assert ("POST", "/apis/ray.io/v1/namespaces/llm/rayservices") in [r[:2] for r in kube.requests]
    code, out = run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)
    assert code == 0, out
    assert "rayservice/vllm configured" in out and "unchanged (kept)" in out
    patches = [r for r in kube.requests if r[0] == "PATCH"]
    assert {r[1] for r in patches} == {"/apis/ray.io/v1/namespaces/llm/rayservices/vllm"}
    assert all(r[2] == "application/merge-patch+json" for r in patches)


def test_apply_renders_a_serve_config_for_the_kubernetes_api_test_double(kube):
    code, out = run(
        "apply",
        str(ROOT / "serve_configs" / "smollm2-cpu.yaml"),
        "--kubeconfig",
        kube.kubeconfig,
        "-n",
        "team-a",
    )
    assert code == 0, out
    assert ("team-a", "rayservices", "smollm2-cpu") in kube.objects


def test_status_waits_for_ready_and_prints_endpoint_with_kubernetes_api_test_double(kube):
    assert run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)[0] == 0
    code, out = run("status", "vllm", "--kubeconfig", kube.kubeconfig, "--poll", "0.01")
    assert code == 0, out
    assert "Ready" in out and "vrstack: RUNNING" in out
    assert "http://vllm-router-service.llm.svc.cluster.local" in out
    assert "port-forward svc/vllm-router-service 30080:80" in out
    assert kube.gets >= 3


def test_status_without_wait_exits_3_when_not_ready_on_kubernetes_api_test_double(kube):
    kube.ready_after_gets = 100
    assert run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)[0] == 0
    code, out = run("status", str(MANIFEST), "--kubeconfig", kube.kubeconfig, "--no-wait")
    assert code == 3 and "not ready (Initializing)" in out and "DEPLOYING" in out
    code, out = run(
        "status", "vllm", "--kubeconfig", kube.kubeconfig, "--timeout", "0.2", "--poll", "0.05"
    )
    assert code == 1 and "not Ready after" in out


def test_delete_keeps_model_cache_on_kubernetes_api_test_double(kube):
    assert run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)[0] == 0
    code, out = run("delete", "vllm", "--kubeconfig", kube.kubeconfig)
    assert code == 0, out
    assert "rayservice/vllm deleted" in out
    assert list(kube.objects) == [("llm", "persistentvolumeclaims", "vllm-model-cache")]
    code, out = run("delete", "vllm", "--kubeconfig", kube.kubeconfig, "--delete-cache")
    assert code == 0 and "persistentvolumeclaim/vllm-model-cache deleted" in out
    assert kube.objects == {}


def test_missing_kuberay_crd_is_named_by_kubernetes_api_test_double(kube):
    kube.kuberay = False
    for command in ("apply", "status", "delete"):
        target = str(MANIFEST) if command == "apply" else "vllm"
        code, out = run(command, target, "--kubeconfig", kube.kubeconfig)
        assert code == 1, out
        assert "KubeRay CRDs are not installed" in out and "helm install kuberay-operator" in out
    assert not any(r[0] == "POST" for r in kube.requests)


def test_forbidden_is_explained_by_kubernetes_api_test_double(kube):
    kube.forbidden = True
    code, out = run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)
    assert code == 1
    assert "forbidden" in out and "namespace 'llm'" in out and "cannot post" in out


def test_no_cluster_configured_or_reachable(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, out = run("status", "vllm", "--kubeconfig", str(tmp_path / "missing"))
    assert code == 1 and "no Kubernetes cluster configured" in out
    dead = tmp_path / "dead"  # a port nobody listens on, loopback only
    dead.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    code, out = run("status", "vllm", "--kubeconfig", str(dead))
    assert code == 1 and "cannot reach the Kubernetes API server at http://127.0.0.1:9" in out


def test_unknown_rayservice_on_kubernetes_api_test_double(kube):
    code, out = run("status", "nope", "--kubeconfig", kube.kubeconfig, "--no-wait")
    assert code == 1 and "RayService 'nope' not found in namespace 'llm'" in out


def test_manifest_documents_are_sent_unchanged_to_kubernetes_api_test_double(kube):
    assert run("apply", str(MANIFEST), "--kubeconfig", kube.kubeconfig)[0] == 0
    sent = kube.objects[("llm", "rayservices", "vllm")]
    (expected,) = [
        d for d in yaml.safe_load_all(Path(MANIFEST).read_text()) if d and d["kind"] == "RayService"
    ]
    assert sent["spec"] == expected["spec"]
