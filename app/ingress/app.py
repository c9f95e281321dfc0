"""The FastAPI application: routes per endpoint, error handlers and middleware around a Gateway."""

from __future__ import annotations

from fastapi import FastAPI

from app import __version__
from app.ingress.errors import install_error_handlers
from app.ingress.gateway import Gateway
from app.ingress.middleware import BodyLimitMiddleware, RequestIdMiddleware
from app.ingress.routes import chat, completions, embeddings, health, models, tokenize


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
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=gateway.config.limits.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
