"""Ray Serve's custom `RequestRouter` API, driven by a policy from `app.routing`.

Serve creates one `StackRequestRouter` per engine deployment in every process holding a handle
to it: the ingress. It learns the deployment's running replicas, their replica metadata (each
replica's HTTP port) and their routing stats from Serve, and chooses replicas in two ways:
- `route(view)`: for HTTP requests, which the ingress relays to the chosen replica's port itself
  (`app.ingress.relay`); the ingress reports the answer's first byte and its end, so in-flight
  counts and the policy's view of outstanding prefill stay true;
- `choose_replicas(...)`: Serve's hook, for handle calls (the stack's Python API).
Both go through one lock: Serve may run its hook on another thread than the ingress's.
A policy that routes from the engines' KV cache events (`kv`) gets them from a `KvFeed`
thread (`app.engines.kv_feed`), under the same lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from app.engines import router_registry
from app.engines.kv_feed import FeedCounts, KvFeed, Source
from app.engines.kv_publisher import METADATA_KEY
from app.routing import (
    Decision,
    KvEvent,
    NoReplicaError,
    ReplicaStats,
    RequestView,
    make_policy,
    view_of_body,
)

ROUTER_CLASS = "app.engines.router:StackRequestRouter"
STATS_PERIOD_S = 2  # how often Serve asks each replica for its routing stats
# An adapter sent to a replica counts as held there until the replica's reports could say so.
ADAPTER_SENT_S = 3 * STATS_PERIOD_S


@dataclass(frozen=True, slots=True, eq=False)
class Routed:
    """The replica chosen for one relayed request, and why."""

    replica_id: str
    url: str  # the replica's HTTP port
    decision: Decision
    view: RequestView
    key: int  # the request's entry among the router's open requests


def request_view(model: str, pending: PendingRequest | None) -> RequestView:
    """The routing view of a `serve_openai(endpoint, body)` handle call: its body
    (`app.routing.view_of_body`), Serve's session id and multiplexed model id (LoRA adapter)."""
    if pending is None:
        return view_of_body({}, model=model)
    args = pending.args
    body = args[1] if len(args) >= 2 and isinstance(args[1], dict) else {}
    named = body.get("model")
    adapter = named if isinstance(named, str) and named != model else None  # (the ingress
    # names the model by its canonical name, an adapter by its own)
    return view_of_body(
        body,
        model=model,
        session_key=pending.metadata.session_id,
        lora_adapter=pending.metadata.multiplexed_model_id or adapter,
    )


class StackRequestRouter(FIFOMixin, RequestRouter):
    """Routes each engine request with an `app.routing` policy.

    1. Read the request's model, prompt (text, messages or token ids), session key and LoRA
       adapter.
    2. Describe each candidate replica: in-flight requests (this router's own count, or the
       replica's reported one if higher), queued requests, KV usage and health (a replica
       whose engine is gone says so) from the replica's `record_routing_stats`, its
       concurrency limit, and the LoRA adapters it holds (those it reports, and those this
       router sent it since: it loads them on their first request).
    3. Ask the policy. A relayed request goes to the chosen replica's port (with the ingress's
       fair admission, chosen among the replicas with a free engine slot when any has one, by
       this router's own count against the ingress replica's share of the slots); a
       handle call gets the chosen replica as the first rank and the others, by load, as
       fallbacks.
    4. Track in-flight requests; tell the policy when a relayed request has its first byte
       (its prefill is done) and when any request completes. Each request is counted once,
       on the replica it went to, and released exactly once however it ends: answered, failed,
       routed again, or cancelled while Serve still queued it (its routing future cancelled).
    """

    def initialize_state(self, policy: str = "scored", model: str = "", **settings: Any) -> None:
        self._policy = make_policy(policy, **settings)
        self._model = model
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._in_flight: dict[str, int] = {}  # replica id -> open requests (none: no entry)
        self._open: dict[Any, _Open] = {}  # request key -> where it went
        self.replicas_known = False  # Serve has told this router the running replicas
        self._kv_feed = KvFeed(self, f"kv-feed-{model}") if self._policy.kv_events else None
        # replica id -> adapter -> when this router last sent it a request of that adapter
        self._adapters_sent: dict[str, dict[str, float]] = {}
        router_registry.register(model, self)

    # -- relayed requests (the ingress's HTTP path) ------------------------------------------
    def route(
        self,
        view: RequestView,
        exclude: Collection[str] = (),
        candidates: Iterable[Any] | None = None,
        *,
        slots: float | None = None,
    ) -> Routed | None:
        """Choose a running replica with an HTTP port (none of `exclude`) for a relayed request;
        None when there is none. `candidates` defaults to the replicas Serve reports. `slots`
        (the ingress admits requests by engine slots: this ingress replica's share of each
        engine's): only replicas to which this router has fewer requests in flight than that
        are candidates, when any is (a request sent to a full engine waits there, behind what
        runs, whatever its priority). Its own count, not the replicas' reports: those are up
        to a stats period old, and an engine that looked full there left a free slot unused
        while the request queued in the other engine."""
        found = {
            r.replica_id.unique_id: r
            for r in (self.curr_replicas.values() if candidates is None else candidates)
            if r.replica_id.unique_id not in exclude and r.replica_metadata.get("url")
        }
        if not found:
            return None
        with self._lock:
            stats = [self._stats(r) for r in found.values()]
            if slots is not None:
                own = self._in_flight
                stats = [s for s in stats if own.get(s.replica_id, 0) < slots] or stats
            try:
                decision = self._policy.choose(view, stats)
            except NoReplicaError:
                return None
            key = next(self._keys)
            self._track(key, decision.replica_id, view)
        url = found[decision.replica_id].replica_metadata["url"]
        return Routed(decision.replica_id, url, decision, view, key)

    def first_token(self, routed: Routed) -> None:
        """The relayed request's answer started: its prefill is done."""
        with self._lock:
            if routed.key in self._open:
                self._policy.on_first_token(routed.view, routed.replica_id)

    def finish(self, routed: Routed) -> None:
        """The relayed request ended (answered, failed or abandoned)."""
        with self._lock:
            self._release(routed.key)

    def replica_count(self) -> int:
        """Running replicas with an HTTP port."""
        return sum(1 for r in self.curr_replicas.values() if r.replica_metadata.get("url"))

    # -- Serve's hooks ---------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.replicas_known = True
        if self._kv_feed is not None:
            self._watch_kv_events(replicas)

    # -- KV cache events (a `kv` policy) ----------------------------------------------------------
    def _watch_kv_events(self, replicas: list[RunningReplica]) -> None:
        """Follow the replicas' KV event publishers; take the engines' block size."""
        sources: dict[str, Source] = {}
        for replica in replicas:
            published = replica.replica_metadata.get(METADATA_KEY)
            if not isinstance(published, dict) or (source := Source.of(published)) is None:
                continue
            sources[replica.replica_id.unique_id] = source
            block_size = published.get("block_size")
            if isinstance(block_size, int) and block_size != self._policy.block_size:
                with self._lock:  # request views hash their prompts per block size
                    self._policy.block_size = block_size
        assert self._kv_feed is not None
        self._kv_feed.watch(sources)

    def apply(self, replica_id: str, events: Sequence[KvEvent]) -> None:
        """A replica's KV cache events, in order (`KvFeed`'s sink)."""
        with self._lock:
            for event in events:
                self._policy.on_kv_event(self._model, replica_id, event)

    def reset(self, replica_id: str) -> None:
        """Forget a replica's cache: its events are rebuilding it (`KvFeed`'s sink)."""
        with self._lock:
            self._policy.forget_blocks(replica_id)

    def kv_counts(self) -> FeedCounts | None:
        """What the KV event feed has done (None: the policy takes no events)."""
        return None if self._kv_feed is None else self._kv_feed.counts

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        view = request_view(self._model, pending_request)
        with self._lock:
            try:
                decision = self._policy.choose(view, [self._stats(r) for r in candidate_replicas])
            except NoReplicaError:
                return []
            if pending_request is not None:
                self._track_pending(pending_request, decision.replica_id, view)
            loads = dict(self._in_flight)
        chosen = next(
            r for r in candidate_replicas if r.replica_id.unique_id == decision.replica_id
        )
        rest = sorted(
            (r for r in candidate_replicas if r is not chosen),
            key=lambda r: loads.get(r.replica_id.unique_id, 0),
        )
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        with self._lock:
            opened = self._open.get(internal_request_id)
            if opened is None:
                return
            # Still routing it: a later routing, unless Serve's future already settled on this
            # replica and the call ended before the future's callback (`_routed`) ran.
            if opened.future is None or _settled_on(opened.future, replica_id):
                self._release(internal_request_id)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        gone = replica_id.unique_id
        with self._lock:  # its requests will not complete there
            self._adapters_sent.pop(gone, None)
            for key in [k for k, opened in self._open.items() if opened.replica_id == gone]:
                self._release(key)
            self._policy.forget_replica(gone)

    # -- bookkeeping (under the lock) ----------------------------------------------------------
    def _stats(self, replica: Any) -> ReplicaStats:
        replica_id = replica.replica_id.unique_id
        reported = replica.routing_stats or {}
        return ReplicaStats(
            replica_id=replica_id,
            healthy=bool(reported.get("healthy", True)),  # False: its engine is gone
            in_flight=max(self._in_flight.get(replica_id, 0), int(reported.get("in_flight", 0))),
            queued=int(reported.get("queued", 0)),
            kv_usage=float(reported.get("kv_usage", 0.0)),
            max_concurrency=max(1, replica.max_ongoing_requests),
            lora_adapters=self._adapters(replica_id, reported.get("lora_adapters")),
        )

    def _track(self, key: Any, replica_id: str, view: RequestView, future: Any = None) -> None:
        self._release(key)  # routed again (the first choice was full)
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
        self._open[key] = _Open(replica_id, view, future)
        if view.lora_adapter:
            self._adapters_sent.setdefault(replica_id, {})[view.lora_adapter] = time.monotonic()

    def _adapters(self, replica_id: str, reported: Any) -> frozenset[str]:
        """The adapters a replica holds: those it reported, and those sent to it since its
        report may have been made (`ADAPTER_SENT_S`)."""
        held = frozenset(reported) if isinstance(reported, list) else frozenset()
        sent = self._adapters_sent.get(replica_id)
        if not sent:  # (every request of a model without adapters: nothing more to do)
            return held
        recent = time.monotonic() - ADAPTER_SENT_S
        for adapter, at in list(sent.items()):
            if at < recent:
                del sent[adapter]
        return held.union(sent)

    def _track_pending(self, pending: PendingRequest, replica_id: str, view: RequestView) -> None:
        """Track a handle call Serve is routing; its routing future settles where it went (the
        chosen replica or a fallback) or, cancelled, that it went nowhere."""
        key, future = pending.metadata.internal_request_id, pending.future
        watched = (opened := self._open.get(key)) is not None and opened.future is future
        self._track(key, replica_id, view, future)
        if not watched:
            future.add_done_callback(lambda done: self._routed(key, done))

    def _routed(self, key: Any, future: Any) -> None:
        """Serve settled a handle call's routing future: count the call on the replica it got;
        release it if it was cancelled (or failed) before reaching one."""
        with self._lock:
            opened = self._open.get(key)
            if opened is None or opened.future is not future:
                return
            if future.cancelled() or future.exception() is not None:
                self._release(key)
                return
            opened.future = None  # sent: Serve reports its completion
            replica_id = future.result().replica_id.unique_id
            if replica_id != opened.replica_id:
                self._decrement(opened.replica_id)
                self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
                opened.replica_id = replica_id

    def _release(self, key: Any) -> None:
        opened = self._open.pop(key, None)
        if opened is not None:
            self._decrement(opened.replica_id)
            self._policy.on_complete(opened.view, opened.replica_id)

    def _decrement(self, replica_id: str) -> None:
        count = self._in_flight.get(replica_id, 0) - 1
        if count > 0:
            self._in_flight[replica_id] = count
        else:
            self._in_flight.pop(replica_id, None)


def _settled_on(future: Any, replica_id: Any) -> bool:
    """A handle call's routing future holds `replica_id` as its result."""
    return (
        future.done()
        and not future.cancelled()
        and future.exception() is None
        and future.result().replica_id == replica_id
    )


@dataclass(slots=True)
class _Open:
    """An open request: its replica, its view, and (a handle call Serve is still routing) its
    routing future."""

    replica_id: str
    view: RequestView
    future: Any = None
