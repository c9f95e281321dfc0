"""GET /metrics (Prometheus text format) and GET /status (the same state as JSON, for
`vrstack status`)."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.ingress.routes.common import GatewayDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(gateway: GatewayDep, request: Request) -> Response:
    """The ingress's metrics (docs/metrics.md), engine replicas' state included."""
    stack = request.app.state.metrics
    stack.refresh([gateway.state(spec) for spec in gateway.config.models])
    return Response(generate_latest(stack.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/status")
async def status(gateway: GatewayDep, request: Request) -> dict[str, Any]:
    """Models, their replicas' engine state, and this ingress's in-flight requests."""
    stack = request.app.state.metrics
    live = stack.status()
    models = []
    for spec in gateway.config.models:
        state = gateway.state(spec)
        models.append({
            "name": spec.name,
            "aliases": spec.aliases,
            "ready": state.ready,
            "running_replicas": state.running_replicas,
            "replicas": live["replicas"].get(spec.name, {}),
        })  # fmt: skip
    return {"models": models, "ingress_in_flight": live["in_flight"]}
