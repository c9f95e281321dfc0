"""POST /v1/completions (and /completions)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.ingress.protocol import CompletionRequest
from app.ingress.routes.common import GatewayDep, answer

router = APIRouter(tags=["completions"])


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)
async def create_completion(
    body: CompletionRequest, gateway: GatewayDep, request: Request
) -> Response:
    """Text completion; `stream: true` answers with server-sent events."""
    return await answer(gateway, "completions", body, request)
