"""GET /health (per-model readiness) and GET /version."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.ingress.routes.common import GatewayDep

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(gateway: GatewayDep) -> JSONResponse:
    """200 when every model has a ready replica, else 503; the body says which are ready."""
    states = [gateway.state(spec) for spec in gateway.config.models]
    ready = all(s.ready or s.scales_to_zero for s in states)
    body = {
        "status": "ok" if ready else "unavailable",
        "models": {s.name: s.as_dict() for s in states},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/version")
async def version() -> dict[str, Any]:
    """The stack's version and its main parts' versions."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    parts: dict[str, Any] = {"version": __version__}
    for dist in ("ray", "fastapi"):
        try:
            parts[dist] = dist_version(dist)
        except PackageNotFoundError:  # pragma: no cover - both are dependencies
            parts[dist] = None
    return parts
