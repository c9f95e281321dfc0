"""POST /v1/embeddings (and /embeddings), for models whose engine runs a pooling task."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.ingress.protocol import EmbeddingRequest
from app.ingress.routes.common import GatewayDep, answer

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings")
@router.post("/embeddings", include_in_schema=False)
async def create_embedding(
    body: EmbeddingRequest, gateway: GatewayDep, request: Request
) -> Response:
    """Embeddings; a model that cannot embed answers 400."""
    return await answer(gateway, "embeddings", body, request)
