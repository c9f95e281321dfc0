"""POST /v1/score (and /score) and /v1/rerank (and /rerank): vLLM's scoring endpoints, for
pooling models (embedding models and cross-encoders)."""

from app.ingress.protocol import RerankRequest, ScoreRequest
from app.ingress.routes.common import PostRoute

SCORE = PostRoute(
    "score",
    ScoreRequest,
    ("/v1/score", "/score"),
    "Relevance scores of pairs of inputs (vLLM's score API); pooling models only.",
)
RERANK = PostRoute(
    "rerank",
    RerankRequest,
    ("/v1/rerank", "/rerank"),
    "Documents ordered by relevance to a query (vLLM's rerank API); pooling models only.",
)
