"""POST /v1/embeddings (and /embeddings), for models whose engine runs a pooling task."""

from app.ingress.protocol import EmbeddingRequest
from app.ingress.routes.common import PostRoute

ROUTE = PostRoute(
    "embeddings",
    EmbeddingRequest,
    ("/v1/embeddings", "/embeddings"),
    "Embeddings; a model that cannot embed answers 400.",
)
