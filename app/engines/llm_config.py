"""From a `ModelSpec` to a Ray Serve LLM deployment (`LLMConfig` + `build_llm_deployment`)."""

from __future__ import annotations

import math
from typing import Any

from app.config import KVOffload, ModelSpec, RouterSettings
from app.config.embedded import embedded_name
from app.engines import embedded
from app.engines.autoscaling import POLICY as AUTOSCALING_POLICY
from app.engines.http_server import SHUTDOWN_S

DEPLOYMENT_PREFIX = "engine:"


def deployment_name(spec: ModelSpec) -> str:
    """The Serve deployment name of a model's engine (Ray replaces '/' and '.')."""
    return DEPLOYMENT_PREFIX + spec.name.replace("/", "--").replace(".", "_")


def resolve_source(source: str) -> str:
    """A source vLLM can load: embedded models load from their cache folder, which each engine
    replica fills (once) before its engine starts; see `EngineServer`."""
    name = embedded_name(source)
    return str(embedded.model_dir(name)) if name is not None else source


def engine_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": spec.dtype, **spec.engine_args}
    # Answers tell the prompt tokens the engine's prefix cache served, as OpenAI's do
    # (`usage.prompt_tokens_details.cached_tokens`); the router's receipts compare them.
    kwargs.setdefault("enable_prompt_tokens_details", True)
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.kv_offload is not None:
        kwargs["kv_transfer_config"] = dict(LMCACHE_CONNECTOR)
    if spec.lora is not None:
        kwargs.update(spec.lora.engine_kwargs())
    return kwargs


LMCACHE_CONNECTOR = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
LMCACHE_DEFAULT_CPU_GB = 5.0  # LMCache's own default for max_local_cpu_size


def _gb(value: float) -> str:
    return f"{value:g}"


def kv_offload_env(offload: KVOffload) -> dict[str, str]:
    """LMCache's `LMCACHE_*` settings for a `kv_offload` spec (read by the engine process)."""
    env = {"LMCACHE_CHUNK_SIZE": str(offload.chunk_size)}
    cpu_gb = offload.cpu_gb
    if cpu_gb is None and offload.disk_gb is None and offload.remote_url is None:
        cpu_gb = LMCACHE_DEFAULT_CPU_GB
    # LMCache stages disk and remote writes through CPU memory, so it stays on with them.
    env["LMCACHE_LOCAL_CPU"] = "True"
    if cpu_gb is not None:
        env["LMCACHE_MAX_LOCAL_CPU_SIZE"] = _gb(cpu_gb)
    if offload.disk_gb is not None and offload.disk_path is not None:
        env["LMCACHE_LOCAL_DISK"] = "file://" + offload.disk_path.rstrip("/") + "/"
        env["LMCACHE_MAX_LOCAL_DISK_SIZE"] = _gb(offload.disk_gb)
    if offload.remote_url is not None:
        env["LMCACHE_REMOTE_URL"] = offload.remote_url
        env["LMCACHE_REMOTE_SERDE"] = "naive"
    return env


def cpu_threads_env(spec: ModelSpec) -> dict[str, str]:
    """A CPU engine's threads: as many as its `resources.cpu`, placed by the OS.

    vLLM's CPU backend binds its worker's threads by default (`VLLM_CPU_OMP_THREADS_BIND=auto`)
    to the first NUMA node's cores but one, the same cores for every engine of the node: two
    engines on one node then share a core while another idles. A GPU engine: nothing."""
    if spec.on_gpu:
        return {}
    threads = max(1, math.floor(spec.resources.cpu))
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}


def engine_env(spec: ModelSpec) -> dict[str, str]:
    """The engine process's environment: a CPU engine's threads (`cpu_threads_env`),
    `kv_offload`'s LMCache settings, then `env` (wins)."""
    env = kv_offload_env(spec.kv_offload) if spec.kv_offload is not None else {}
    return {**cpu_threads_env(spec), **env, **spec.env}


def placement_bundles(spec: ModelSpec) -> list[dict[str, float]]:
    """One replica's placement group: one bundle per GPU, since vLLM places one worker per
    bundle and refuses a bundle with more than one GPU (`initialize_ray_cluster` in
    `vllm/v1/executor/ray_utils.py`). The replica's CPUs, memory and custom resources go in the
    first bundle, where Ray Serve LLM puts the replica actor's own (`_merge_replica_actor_and_
    child_actor_bundles`) and the engine process runs. A CPU engine (or a fraction of a GPU):
    one bundle."""
    res = spec.resources
    first: dict[str, float] = {"CPU": res.cpu}
    if res.gpu:
        first["GPU"] = min(res.gpu, 1.0)
    if (memory := res.memory_bytes()) is not None:
        first["memory"] = memory
    first.update(res.custom)
    return [first] + [{"GPU": 1.0} for _ in range(1, math.ceil(res.gpu))]


def kv_events(router: RouterSettings) -> bool:
    """Whether the engines publish their KV cache events to the router (its policy reads
    them: `kv`)."""
    from app.routing import uses_kv_events

    return uses_kv_events(router.policy, **router.settings)


def router_config(spec: ModelSpec, router: RouterSettings) -> dict[str, Any]:
    """Serve's `request_router_config`: our router class with the configured policy."""
    from app.engines.router import ROUTER_CLASS, STATS_PERIOD_S

    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {"policy": router.policy, "model": spec.name, **router.settings},
        "request_routing_stats_period_s": STATS_PERIOD_S,
    }


def deployment_config(spec: ModelSpec, router: RouterSettings | None = None) -> dict[str, Any]:
    # The replica actor takes no CPU of its own, so the bundle is exactly `resources`.
    scaling: dict[str, Any] = (
        {"num_replicas": spec.replicas}
        if spec.autoscaling is None
        else {
            "autoscaling_config": {
                **spec.autoscaling.model_dump(),
                "policy": {"policy_function": AUTOSCALING_POLICY},  # relayed requests count
            }
        }
    )
    # No access log: the ingress's /metrics counts every request. A stopping replica finishes
    # its answers (`http_server.DRAIN_S`), longer than Ray's default shutdown allows.
    options = {**scaling, "ray_actor_options": {"num_cpus": 0}}
    options["graceful_shutdown_timeout_s"] = SHUTDOWN_S
    options["logging_config"] = {"enable_access_log": False}
    if router is not None:
        options["request_router_config"] = router_config(spec, router)
    return options


def llm_config(
    spec: ModelSpec,
    *,
    source: str | None = None,
    router: RouterSettings | None = None,
    skip_noop_download: bool = True,
) -> Any:
    """The Ray Serve LLM `LLMConfig` for one model (source resolved unless given).

    `skip_noop_download`: skip Ray's per-node download task where it has nothing to download
    (`app.ray_internals.SkipNoOpDownload`); off, the config is Ray Serve LLM's default."""
    from ray.serve.llm import LLMConfig

    from app.ray_internals import CALLBACK_CLASS

    extra = {"callback_config": {"callback_class": CALLBACK_CLASS}} if skip_noop_download else {}
    return LLMConfig(
        model_loading_config={
            "model_id": spec.name,
            "model_source": source or resolve_source(spec.source),
        },
        engine_kwargs=engine_kwargs(spec),
        deployment_config=deployment_config(spec, router),
        placement_group_config={"bundles": placement_bundles(spec)},
        accelerator_type=spec.resources.accelerator_type,
        runtime_env={"env_vars": env} if (env := engine_env(spec)) else None,
        **extra,
    )


def build_engine(spec: ModelSpec, router: RouterSettings) -> Any:
    """A bound Serve application hosting `spec`'s vLLM engine in `EngineServer` replicas, which
    answer the ingress on their own HTTP ports."""
    from ray.serve.llm import build_llm_deployment

    from app.engines.llm_server import EngineServer
    from app.engines.placement import warn_if_unplaceable

    warn_if_unplaceable(spec)  # a replica no node can hold would otherwise wait in silence
    config = llm_config(spec, router=router)
    # Each stream chunk leaves as the engine makes it: the replica's port sends bytes, not Ray
    # stream messages, so gathering chunks (50 ms by default) would only add latency.
    config.experimental_configs["stream_batching_interval_ms"] = 0
    return build_llm_deployment(
        config,
        deployment_cls=EngineServer,
        bind_kwargs={
            "embedded_model": spec.embedded_model,
            "kv_events": kv_events(router),
            "lora": spec.lora.model_dump(mode="json") if spec.lora is not None else None,
        },
        override_serve_options={"name": deployment_name(spec)},
    )
