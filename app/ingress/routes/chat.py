"""POST /v1/chat/completions (and /chat/completions)."""

from app.ingress.protocol import ChatCompletionRequest
from app.ingress.routes.common import PostRoute

ROUTE = PostRoute(
    "chat",
    ChatCompletionRequest,
    ("/v1/chat/completions", "/chat/completions"),
    "Chat completion; `stream: true` answers with server-sent events.",
)
