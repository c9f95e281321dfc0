"""POST /v1/completions (and /completions)."""

from app.ingress.protocol import CompletionRequest
from app.ingress.routes.common import PostRoute

ROUTE = PostRoute(
    "completions",
    CompletionRequest,
    ("/v1/completions", "/completions"),
    "Text completion; `stream: true` answers with server-sent events.",
)
