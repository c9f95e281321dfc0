"""POST /tokenize and /detokenize (vLLM's extension endpoints, also under /v1)."""

from app.ingress.protocol import DetokenizeRequest, TokenizeRequest
from app.ingress.routes.common import PostRoute

TOKENIZE = PostRoute(
    "tokenize",
    TokenizeRequest,
    ("/tokenize", "/v1/tokenize"),
    "Token ids of a prompt or of chat messages rendered with the model's template.",
)
DETOKENIZE = PostRoute(
    "detokenize", DetokenizeRequest, ("/detokenize", "/v1/detokenize"), "Text of token ids."
)
