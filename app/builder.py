"""The Ray Serve application builder named by every serve config's `import_path`.

    import_path: app.builder:build_app
    args: {models: [...], router: {...}, server: {...}, limits: {...}}

The config is validated before anything is deployed, so a wrong config fails `serve run`
with a message naming each bad field, its value and what is allowed.
"""

from __future__ import annotations

from typing import Any

from app.config import StackConfig, load_config


def build_app(args: dict[str, Any] | StackConfig) -> Any:
    """Engine deployments (one per model) behind the OpenAI ingress deployment, which relays
    HTTP requests to the engine replicas' own ports."""
    from app.engines.llm_config import build_engine

    config = load_config(args)
    return ingress_app(
        config, {spec.name: build_engine(spec, config.router) for spec in config.models}
    )


def ingress_app(config: StackConfig, engines: dict[str, Any]) -> Any:
    """The ingress deployment of `config`, bound to its models' engine applications."""
    from app.engines.http_server import SHUTDOWN_S
    from app.ingress.deployment import Ingress
    from app.ingress.middleware import RAY_EDGE_ENV

    server = config.server
    # Ray's env_vars merge with the application's runtime_env (its pip package stays).
    actor_options: dict[str, Any] = {
        "num_cpus": server.ingress_cpus,
        "runtime_env": {"env_vars": dict(RAY_EDGE_ENV)},
    }
    if server.ingress_resources:  # e.g. the ingress group's custom resource on KubeRay
        actor_options["resources"] = dict(server.ingress_resources)
    return Ingress.options(
        name="ingress",
        num_replicas=server.ingress_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=1000,
        graceful_shutdown_timeout_s=SHUTDOWN_S,  # its streams last as long as the engines' drain
        logging_config={"enable_access_log": False},  # /metrics counts every request
    ).bind(config.model_dump(), engines)  # python mode: API keys stay SecretStr, not masked
