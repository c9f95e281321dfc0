"""Ray Serve's custom `RequestRouter` API, driven by a policy from `app.routing`.

The router runs inside the calling (ingress) process, once per engine deployment. The ingress
passes an empty dict as the `route` keyword of each engine call; the router writes its decision
there (`replica_id`, `policy`, `reason`, and the call's `request_id`) before the call leaves the
process, and the ingress turns it into `x-route-*` headers. When the engine's first item
arrives, the ingress notes the request id with the model's routers
(`app.engines.router_registry.first_token`, from the ingress's thread); the router applies
the notes on its own thread at its next choice, as the policy's `on_first_token`.
(Module-level state is no channel: Serve loads the router class apart from the ingress's own
imports.)
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from app.engines import router_registry
from app.routing import (
    Decision,
    NoReplicaError,
    ReplicaStats,
    RequestView,
    make_policy,
    view_of_body,
)

ROUTER_CLASS = "app.engines.router:StackRequestRouter"


def request_view(model: str, pending: PendingRequest | None) -> RequestView:
    """The routing view of an `EngineServer.serve_openai(endpoint, body)` call: its body
    (`app.routing.view_of_body`), Serve's session id and multiplexed model id (LoRA adapter)."""
    if pending is None:
        return view_of_body({}, model=model)
    args = pending.args
    body = args[1] if len(args) >= 2 and isinstance(args[1], dict) else {}
    return view_of_body(
        body,
        model=model,
        session_key=pending.metadata.session_id,
        lora_adapter=pending.metadata.multiplexed_model_id,
    )


def _report(pending: PendingRequest, decision: Decision) -> None:
    slot = pending.kwargs.get("route")
    if isinstance(slot, dict):
        slot.update(
            replica_id=decision.replica_id,
            policy=decision.policy,
            reason=decision.reason,
            request_id=pending.metadata.internal_request_id,
        )


class StackRequestRouter(FIFOMixin, RequestRouter):
    """Routes each engine request with an `app.routing` policy.

    1. Read the request's model, prompt (text, messages or token ids), session key (Serve
       session id or the body's `user`) and LoRA adapter.
    2. Describe each candidate replica: in-flight requests (this router's own count, or the
       replica's reported one if higher), queued requests and KV usage from the replica's
       `record_routing_stats`, and its concurrency limit.
    3. Ask the policy; the chosen replica is the first rank, the others follow by load as
       fallbacks when it cannot take the request.
    4. Track in-flight requests and tell the policy when each has its first token (noted by
       the ingress, applied before the next choice) and when it completes. (Serve calls
       `on_request_routed` only for routers that probe queue lengths, so the choice is
       recorded when it is made.)
    """

    def initialize_state(self, policy: str = "scored", model: str = "", **settings: Any) -> None:
        self._policy = make_policy(policy, **settings)
        self._model = model
        self._in_flight: dict[str, int] = {}
        self._open: dict[str, tuple[str, RequestView]] = {}  # internal request id -> replica
        self._first_tokens: deque[str] = deque(maxlen=100_000)  # ids noted by the ingress
        router_registry.register(model, self)  # the ingress's metrics read `curr_replicas`

    def _stats(self, replica: RunningReplica) -> ReplicaStats:
        replica_id = replica.replica_id.unique_id
        reported = replica.routing_stats or {}
        return ReplicaStats(
            replica_id=replica_id,
            in_flight=max(self._in_flight.get(replica_id, 0), int(reported.get("in_flight", 0))),
            queued=int(reported.get("queued", 0)),
            kv_usage=float(reported.get("kv_usage", 0.0)),
            max_concurrency=max(1, replica.max_ongoing_requests),
        )

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._apply_first_tokens()
        view = request_view(self._model, pending_request)
        try:
            decision = self._policy.choose(view, [self._stats(r) for r in candidate_replicas])
        except NoReplicaError:
            return []
        chosen = next(
            r for r in candidate_replicas if r.replica_id.unique_id == decision.replica_id
        )
        rest = sorted(
            (r for r in candidate_replicas if r is not chosen),
            key=lambda r: self._in_flight.get(r.replica_id.unique_id, 0),
        )
        if pending_request is not None:
            _report(pending_request, decision)
            self._track(pending_request.metadata.internal_request_id, decision.replica_id, view)
        return [[chosen], rest] if rest else [[chosen]]

    def first_token(self, internal_request_id: str) -> None:
        """The ingress got the request's first item (from any thread): noted for the policy."""
        if internal_request_id in self._open:
            self._first_tokens.append(internal_request_id)

    def _apply_first_tokens(self) -> None:
        notes = self._first_tokens
        while notes:
            opened = self._open.get(notes.popleft())
            if opened is not None:
                self._policy.on_first_token(opened[1], opened[0])

    def _track(self, internal_request_id: str, replica_id: str, view: RequestView) -> None:
        self._release(internal_request_id)  # routed again (the first choice was full)
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
        self._open[internal_request_id] = (replica_id, view)

    def _release(self, internal_request_id: str) -> tuple[str, RequestView] | None:
        opened = self._open.pop(internal_request_id, None)
        if opened is not None:
            key = opened[0]
            self._in_flight[key] = max(0, self._in_flight.get(key, 0) - 1)
        return opened

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        opened = self._release(internal_request_id)
        if opened is not None:
            self._policy.on_complete(opened[1], opened[0])

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._in_flight.pop(replica_id.unique_id, None)
        self._policy.forget_replica(replica_id.unique_id)
