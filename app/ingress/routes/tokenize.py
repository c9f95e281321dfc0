"""POST /tokenize and /detokenize (vLLM's extension endpoints, also under /v1)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.ingress.protocol import DetokenizeRequest, TokenizeRequest
from app.ingress.routes.common import GatewayDep, answer

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize")
@router.post("/v1/tokenize", include_in_schema=False)
async def tokenize(body: TokenizeRequest, gateway: GatewayDep, request: Request) -> Response:
    """Token ids of a prompt or of chat messages rendered with the model's template."""
    return await answer(gateway, "tokenize", body, request)


@router.post("/detokenize")
@router.post("/v1/detokenize", include_in_schema=False)
async def detokenize(body: DetokenizeRequest, gateway: GatewayDep, request: Request) -> Response:
    """Text of a list of token ids."""
    return await answer(gateway, "detokenize", body, request)
