"""The FastAPI application: routes per endpoint, error handlers and middleware around a Gateway."""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__
from app.ingress.auth import AuthMiddleware, KeyStore
from app.ingress.error_handlers import install_error_handlers
from app.ingress.gateway import Gateway
from app.ingress.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.ingress.routes import chat, completions, embeddings, health, models, tokenize
from app.ingress.routes import metrics as metrics_routes
from app.observability.metrics import MetricsMiddleware, StackMetrics


def create_app(gateway: Gateway) -> FastAPI:
    """An OpenAI-compatible ASGI app serving `gateway`'s models."""
    app = FastAPI(
        title="vllm-ray-stack",
        version=__version__,
        description="OpenAI-compatible API over vLLM engines on Ray Serve.",
    )
    app.state.gateway = gateway
    for module in (models, completions, chat, embeddings, tokenize, health):
        app.include_router(module.router)
    app.include_router(metrics_routes.router)
    app.state.metrics = StackMetrics(gateway.config)
    install_error_handlers(app)
    config = gateway.config
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    keys = KeyStore.from_settings(config.auth)
    app.add_middleware(AuthMiddleware, keys=keys, protect_metrics=config.auth.protect_metrics)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer has an id
    return app
