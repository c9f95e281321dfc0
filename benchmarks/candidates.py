"""The request paths compared before choosing the shipped one, as Serve applications over the
same simulated engines (`benchmarks.simulated_engine`); the overhead benchmark deploys them
(`--targets ... cand-handle cand-direct stock-direct`). docs/benchmarks/serving.md has the
comparison.

- `cand-handle` (candidate a): the ingress answers HTTP through the engine deployments' Serve
  handles (gRPC streams in Ray's high-throughput mode), the design this stack had before, with
  the ingress's hot path as lean as the shipped one (one raw ASGI pass, `Gateway.stream`).
- `cand-direct` (candidate b): each engine replica is itself the HTTP ingress of its
  application (Ray's direct streaming): HAProxy asks an ingress request router (Ray Serve LLM's
  `LLMRouter`, here over our request router) which replica takes the request and sends it
  straight to that replica's own port, where our engine port app answers. One model per
  application: HAProxy picks the application by path prefix before the router is asked.
- `stock-direct`: stock Ray Serve LLM's direct streaming as it ships (`LLMRouter` over Ray's
  round-robin router), the replica's app being the zero-compute simulator (`sim_server` with
  every cost at 0) where `LLMServer` serves vLLM's own app.
- the shipped path (candidate c, target `ours`): `benchmarks.overhead.deploy_ours`.
"""

from __future__ import annotations

import json
from typing import Any

from ray import serve

from app.config import StackConfig
from app.ingress.gateway import Gateway
from app.ingress.middleware import read_body
from app.ingress.protocol import CompletionRequest
from benchmarks.sim_server import ZERO_COST, App, SimulatedServer
from benchmarks.simulated_engine import SimulatedEngine

_SSE = [(b"content-type", b"text/event-stream")]


class HandleApp:
    """HTTP completions answered through the engines' Serve handles (candidate a)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(scope, receive, 2**21)
        request = CompletionRequest.model_validate(json.loads(body))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        async for chunk in self.gateway.stream("completions", request):
            event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class HandleFront:
    """Candidate a's ingress."""

    def __init__(self, config: dict[str, Any], engines: dict[str, Any]) -> None:
        self.gateway = Gateway(StackConfig.model_validate(config), engines)

    async def __serve_build_asgi_app__(self) -> Any:
        return HandleApp(self.gateway)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class DirectEngine(SimulatedEngine.func_or_class):  # type: ignore[name-defined, misc]
    """Candidate b's engine replica: the simulated engine, its port app as the Serve ingress
    (HAProxy calls it directly, so no internal token)."""

    async def __serve_build_asgi_app__(self) -> Any:
        self._port._token = b""  # HAProxy sends none
        return self._port


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class ZeroComputeReplica:
    """Stock direct streaming's replica, simulated: the zero-compute app as the replica's own
    HTTP app (where `LLMServer` serves vLLM's)."""

    async def __serve_build_asgi_app__(self) -> Any:
        return App(SimulatedServer("stock-direct", ZERO_COST, "sim"))


def direct_app(server: Any) -> Any:
    """`server` (a bound ingress deployment) behind Ray Serve LLM's ingress request router, as
    `build_openai_app` wires direct streaming."""
    from ray.llm._internal.serve.core.ingress.router import LLMRouter

    router = serve.deployment(
        LLMRouter, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
    )
    return server._with_ingress_request_router(router.bind(server=server))
