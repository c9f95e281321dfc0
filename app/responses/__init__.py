"""The OpenAI Responses API served over chat completions, with the stack's own store of
responses (docs/responses.md): `request` (the body), `convert` (to chat and back), `events`
(the stream), `store` (stored responses, shared by every ingress replica)."""

from app.responses.request import ResponsesRequest
from app.responses.store import ResponseStore, shared_store

__all__ = ["ResponseStore", "ResponsesRequest", "shared_store"]
