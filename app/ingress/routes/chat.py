"""POST /v1/chat/completions (and /chat/completions)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.ingress.protocol import ChatCompletionRequest
from app.ingress.routes.common import GatewayDep, answer

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def create_chat_completion(
    body: ChatCompletionRequest, gateway: GatewayDep, request: Request
) -> Response:
    """Chat completion; `stream: true` answers with server-sent events."""
    return await answer(gateway, "chat", body, request)
