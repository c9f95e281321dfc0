"""Ray Serve fronts for the HTTP benchmark, in front of the lab's HTTP simulator (`sim_server`).

Both fronts put forwarding `SimulatedEngine` replicas (`benchmarks.simulated_engine`: one per
simulated replica, each bound to its URL through a `BackendPool`) where engine replicas go:
- `stack_app` is the real stack: Ray Serve proxy -> our `Ingress` -> our request router
  (`app.engines.router`, configured by `app.engines.llm_config.router_config`) -> engines;
- `ray_prefix_app` is stock Ray Serve LLM: proxy -> `OpenAiIngress` (built as `build_openai_app`
  builds it) -> Ray's `PrefixCacheAffinityRouter` with its default settings -> engines, which
  read the prompt from the `CompletionRequest` / `ChatCompletionRequest` argument exactly as in
  front of `LLMServer`.
`RayFronts.deploy` checks that every simulator URL is bound to exactly one replica.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray
from ray import serve

from benchmarks.simulated_engine import BackendPool, SimulatedEngine, simulated_stack

FRONT_KINDS = ("ours-stack", "ray")


def stack_app(pool: Any, replicas: int, policy: str, cache_blocks: int, model: str) -> Any:
    """Our stack as `app.builder.build_app` wires it, with forwarding simulated engines."""
    from app.config import load_config

    settings = (
        {"block_size": 16, "max_blocks": cache_blocks} if policy in ("prefix", "scored") else {}
    )
    config = load_config(
        {
            "models": [{"name": model, "source": "org/simulated", "replicas": replicas}],
            "router": {"policy": policy, "settings": settings},
        }
    )
    options = {"max_ongoing_requests": _ray_llm_max_ongoing()}
    return simulated_stack(config, engine_options=options, pool=pool)


def ray_prefix_app(pool: Any, replicas: int, model: str) -> Any:
    """Stock Ray Serve LLM's ingress and `PrefixCacheAffinityRouter` (default settings) in front
    of forwarding simulated engines, wired as `ray.serve.llm.build_openai_app` wires
    `LLMServer`s."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, make_fastapi_ingress
    from ray.serve.config import RequestRouterConfig
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    engine = SimulatedEngine.options(
        name=model,
        num_replicas=replicas,
        max_ongoing_requests=_ray_llm_max_ongoing(),
        request_router_config=RequestRouterConfig(request_router_class=PrefixCacheAffinityRouter),
    ).bind(pool=pool, ray_llm=True)
    card = ModelCard(id=model, object="model", owned_by="simulator", permission=[], metadata={})
    ingress = serve.deployment(
        make_fastapi_ingress(OpenAiIngress), **OpenAiIngress.get_deployment_options()
    )
    return ingress.bind(llm_deployments={model: engine}, model_cards={model: card})


def _ray_llm_max_ongoing() -> int:
    """Ray Serve LLM's default `max_ongoing_requests` for engine replicas (what `LLMServer`
    and our engines get when the config sets none)."""
    from ray.llm._internal.serve.constants import DEFAULT_MAX_ONGOING_REQUESTS

    return DEFAULT_MAX_ONGOING_REQUESTS


class RayFronts:
    """Deploys fronts on a running Ray Serve (`start` starts one in this process), one in use
    at a time. A Ray front deployed with `keep=True` stays up for the next `deploy` over the
    same simulators, its prefix tree emptied (deploying it costs minutes on a small machine:
    each replica imports vLLM's request models); `clear` removes it."""

    def __init__(self, base_url: str, *, owns_cluster: bool = False) -> None:
        self.base_url = base_url
        self.bindings: dict[str, str] = {}
        self.app_name = ""
        self._owns_cluster = owns_cluster
        self._kept: dict[tuple[str, str, tuple[str, ...]], tuple[str, Any, dict[str, str]]] = {}
        self._pool: Any = None

    @classmethod
    def start(cls, http_port: int) -> RayFronts:
        """A Ray cluster in this process, Serve's proxy on a loopback port; `close` ends both."""
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            namespace="vrstack-peer-bench",
            log_to_driver=False,
        )
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly"
        )
        return cls(f"http://127.0.0.1:{http_port}", owns_cluster=True)

    def deploy(
        self,
        kind: str,
        policy: str,
        workers: list[str],
        cache_blocks: int,
        model: str = "default",
        *,
        keep: bool = False,
    ) -> str:
        """Deploy one front (`ours-stack` with our `policy`, or `ray`) over `workers`; its URL.

        Raises RuntimeError unless each worker URL is bound to exactly one front replica."""
        key = (kind, policy, tuple(workers))
        if key in self._kept:
            self.app_name, self._pool, self.bindings = self._kept[key]
            reset_prefix_tree(self.app_name, model)
            return f"{self.base_url}/{self.app_name}"
        pool = BackendPool.remote(workers)
        if kind == "ours-stack":
            app = stack_app(pool, len(workers), policy, cache_blocks, model)
        elif kind == "ray" and policy == "prefix_cache_affinity":
            app = ray_prefix_app(pool, len(workers), model)
        else:
            raise ValueError(f"unknown Ray front {kind}:{policy}")
        # A fresh application name (and route prefix) each time: Ray's prefix tree actor is
        # named after the application and outlives `serve.delete`.
        self.app_name = f"front-{uuid.uuid4().hex[:8]}"
        serve.run(app, name=self.app_name, route_prefix=f"/{self.app_name}")
        self.bindings = ray.get(pool.bindings.remote())
        if sorted(self.bindings) != sorted(workers) or len(set(self.bindings.values())) != len(
            workers
        ):
            serve.delete(self.app_name)
            raise RuntimeError(f"simulator URLs not bound one-to-one: {self.bindings}")
        self._pool = pool  # kept alive while the front runs
        if keep:
            self._kept[key] = (self.app_name, pool, self.bindings)
        return f"{self.base_url}/{self.app_name}"

    def delete(self) -> None:
        """Remove the front in use, unless it is kept."""
        if self.app_name and all(self.app_name != k[0] for k in self._kept.values()):
            serve.delete(self.app_name)
            time.sleep(1.0)
        self.app_name = ""

    def clear(self) -> None:
        """Remove the kept fronts (before their simulators go)."""
        for app_name, _, _ in self._kept.values():
            serve.delete(app_name)
        self._kept.clear()

    def close(self) -> None:
        """Shut Serve and Ray down if `start` started them."""
        if self._owns_cluster:
            serve.shutdown()
            ray.shutdown()


def reset_prefix_tree(app_name: str, deployment: str) -> None:
    """Empty the prefix tree of Ray's `PrefixCacheAffinityRouter` for an engine deployment
    (remove and re-add every replica), as a fresh deployment would start."""
    from ray.serve._private.constants import SERVE_NAMESPACE

    namespace = f"{SERVE_NAMESPACE}::{app_name}::{deployment}"
    tree = ray.get_actor("LlmPrefixTreeActor", namespace=namespace)
    tenants = list(ray.get(tree.getattr.remote("tenant_to_char_count")))
    ray.get(tree.remove_tenants.remote(tenants))
    ray.get(tree.add_tenants.remote(tenants, time.time()))
    counts = ray.get(tree.getattr.remote("tenant_to_char_count"))
    if sorted(counts) != sorted(tenants) or any(counts.values()):
        raise RuntimeError(f"prefix tree not emptied: {counts}")
