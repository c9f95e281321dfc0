"""The ingress's core: the model table, the checks, and the two ways a request reaches an engine.

- HTTP requests (`relay_http`) go to a replica chosen by the model's request router
  (`app.engines.router`) and are relayed to that replica's own port (`app.ingress.relay`):
  retried on another replica while nothing has been sent (the replica is unreachable, drops
  the connection, or answers that its engine is gone), a stream that breaks later continued on
  another replica (`app.ingress.migration`), the choice reported in `x-route-*` headers, the
  first byte and the end reported back to the router (exactly once, however the attempt ends:
  answered, failed, timed out or cancelled).
- Python handle calls (`call`, `stream`) go through the engine deployment's Serve handle,
  which the same router routes, and get plain items (`app.engines.items`).
Both take the same model resolution and limits. With tenants configured, each model has a fair
admission gate in this ingress replica (`gate_of`; HTTP requests wait there, handle calls do
not), and requests to engines that schedule by priority carry the tenant's `priority`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from app.config import PRIORITY_CLASSES, ModelSpec, StackConfig, Tenant
from app.config.stack import SCHEDULING_POLICY
from app.engines import router_registry
from app.engines.http_server import DONE_EVENT, ENDPOINTS, ENGINE_UNAVAILABLE, Usage
from app.engines.items import Endpoint, EngineItem
from app.engines.router_registry import EngineRoutes
from app.errors import OpenAIError, error_body
from app.ingress.engine_http import EngineResponse, Stopped
from app.ingress.limits import KeyLimiter, Lease
from app.ingress.migration import Stream, migratable, relay_events
from app.ingress.prompt_tokens import PromptCounter
from app.ingress.protocol import OpenAIRequest, PoolingRequest, SamplingRequest, approx_tokens
from app.ingress.relay import (
    Relay,
    RelayError,
    Send,
    engine_unavailable,
    pass_through,
    stream_head,
)
from app.observability.tracing import RequestTrace, Span, Tracing, end_attempt
from app.routing import Decision, RequestView, uses_kv_events, view_of_body
from app.routing.receipts import RouteReceipt
from app.tenants import AdmissionGate, FairQueue, Slot

logger = logging.getLogger("vrstack.ingress")
ENGINE_PATHS: dict[str, str] = {endpoint: path for path, endpoint in ENDPOINTS.items()}
REPLICA_FAILED = "replica_failed"
ROUTER_WAIT_S = 5.0  # how long a request waits for its model's router to learn the replicas
GATED: frozenset[str] = frozenset(  # the engine's work
    {"completions", "chat", "embeddings", "score", "rerank"}
)
POOLING_ONLY: frozenset[str] = frozenset({"score", "rerank"})  # endpoints of pooling models
STANDARD_PRIORITY = PRIORITY_CLASSES["standard"]  # keys without a tenant, and handle calls
# vLLM's default max_num_seqs for its OpenAI server (`EngineArgs.get_batch_defaults`): 128 per
# tensor x pipeline parallel rank on CPU; 256 on most GPUs (1024 on H100-class ones: set
# max_num_seqs in engine_args to say so).
CPU_SEQS_PER_RANK = 128
GPU_SEQS = 256
TOKENIZER_METHOD = "tokenizer_spec"  # `EngineServer.tokenizer_spec`
TOKENIZER_TIMEOUT_S = 120.0  # one fetch of a model's tokenizer from an engine replica
TOKENIZER_ATTEMPTS = 3
LONG_PROMPT_TOKENS = 2048  # estimated; counted in a thread, not on the event loop (~0.3 µs/char)


class EngineHandle(Protocol):
    """The part of a Ray Serve `DeploymentHandle` the gateway uses."""

    def options(self, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class ModelState:
    """Whether a model can take requests now."""

    name: str
    running_replicas: int
    scales_to_zero: bool

    @property
    def ready(self) -> bool:
        return self.running_replicas > 0

    def as_dict(self) -> dict[str, object]:
        return {"ready": self.ready, "running_replicas": self.running_replicas}


@dataclass(slots=True)
class Exchange:
    """What the HTTP path learns of one request as it goes (for metrics and logs)."""

    first_byte_at: float | None = None
    decision: Decision | None = None
    trace: RequestTrace | None = None  # with `tracing` configured
    usage: Usage | None = None  # the answer's tokens, as the engine told them
    view: RequestView | None = None  # the request as the router read it (capture reuses it)
    stream: Stream | None = None  # a migratable stream's state (`app.ingress.migration`)
    slot: Slot | None = None  # its fair admission slot (with tenants)
    priority: int | None = None  # the class its slot was granted in (a demoted one's is lower)
    preempted: bool = False  # stopped for a more important waiter; goes on once it has a slot
    preemptions: int = 0

    def told_usage(self, usage: Usage) -> None:
        self.usage = usage


class Gateway:
    """Model-aware front door for every engine deployment of one stack."""

    def __init__(
        self,
        config: StackConfig,
        engines: Mapping[str, EngineHandle],
        *,
        token: str = "",
        routes: Callable[[str], EngineRoutes | None] = router_registry.get,
    ) -> None:
        self.config = config
        self.tenants = {tenant.name: tenant for tenant in config.tenants}
        self._allowed = {  # tenant -> the canonical names of the models it may use
            t.name: frozenset(spec.name for n in t.models if (spec := config.model(n)))
            for t in config.tenants
            if t.models is not None
        }
        self.limiter = KeyLimiter(
            config.limits.per_key, tenants={t.name: t.quotas for t in config.tenants}
        )
        self.relay = Relay(token, timeout_s=config.server.request_timeout_s)
        self._routes = routes
        # With tenants, a fair admission gate per model. Engine requests of models whose
        # engines schedule by priority (with tenants the config sets that unless told
        # otherwise) carry `priority`: the tenant's class, `standard` without one, and
        # `batches.priority` for batch work.
        self.gates: dict[str, AdmissionGate] = {}
        if config.tenants:
            self.gates = {spec.name: self._gate(spec) for spec in config.models}
        self._priority = frozenset(
            spec.name
            for spec in config.models
            if spec.engine_args.get(SCHEDULING_POLICY) == "priority"
        )
        self.tracing = Tracing(config.tracing) if config.tracing is not None else None
        self._handles = {  # making them starts each model's router in this process
            name: handle.options(stream=True, method_name="serve_openai")
            for name, handle in engines.items()
        }
        # Prompt tokens counted with each model's tokenizer (fetched from its engine after
        # start: `fetch_tokenizers`), only when something charges tokens; until then, or
        # without it, the 4-characters estimate (`approx_tokens`).
        self.counts_tokens = (
            bool(config.tenants) or config.limits.per_key.tokens_per_minute is not None
        )
        # The router matches prompts with the engines' cached blocks by token ids (`kv`).
        self.routes_by_tokens = uses_kv_events(config.router.policy, **config.router.settings)
        self.counters: dict[str, PromptCounter] = {}
        self._fetches: list[asyncio.Task] = []
        self._count_failed = False

    # -- models -------------------------------------------------------------------------------
    def resolve(self, name: str, tenant: str | None = None) -> ModelSpec:
        """The model a name or alias refers to, or a 404 naming the available models. A
        tenant's request for a model it may not use is the same 404 as for one that does not
        exist (OpenAI's answer to a key without access), naming only the tenant's models."""
        spec = self.config.model(name)
        allowed = self._allowed.get(tenant) if tenant is not None else None
        if spec is None or (allowed is not None and spec.name not in allowed):
            available = ", ".join(n for m in self._models(tenant) for n in m.names)
            raise OpenAIError(
                404,
                f"model {name!r} does not exist or you do not have access to it; available "
                f"models: {available}",
                param="model",
                code="model_not_found",
            )
        return spec

    def _models(self, tenant: str | None) -> list[ModelSpec]:
        """The models a tenant may use (every model for other callers)."""
        allowed = self._allowed.get(tenant) if tenant is not None else None
        return [m for m in self.config.models if allowed is None or m.name in allowed]

    def model_cards(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """OpenAI model objects: every model, alias and LoRA adapter (`root` names the
        canonical model an alias or adapter runs on); for a tenant, those of its models."""
        return [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm-ray-stack",
                "root": spec.name,
                "parent": None if name == spec.name else spec.name,
                "max_model_len": spec.max_model_len,
            }
            for spec in self._models(tenant)
            for name in spec.served_names
        ]

    def state(self, spec: ModelSpec) -> ModelState:
        """The model's running replicas, as its router in this process sees them."""
        routes = self._routes(spec.name)
        scales_to_zero = spec.autoscaling is not None and spec.autoscaling.min_replicas == 0
        return ModelState(spec.name, routes.replica_count() if routes else 0, scales_to_zero)

    # -- fair admission (with tenants) ---------------------------------------------------------
    def _gate(self, spec: ModelSpec) -> AdmissionGate:
        admission = self.config.admission
        queue: FairQueue = FairQueue(
            max_queue_per_tenant=admission.max_queue_per_tenant,
            max_wait_s=admission.max_wait_s,
            weights={t.name: t.weight for t in self.config.tenants},
            demote_backlog=admission.demote_backlog,
        )
        return AdmissionGate(lambda: self.capacity(spec), queue, preempt=admission.preempt)

    def capacity(self, spec: ModelSpec) -> int:
        """Requests of the model this ingress replica lets into its engines at once: the
        running replicas (at least 1: a model scaled to zero gets the slots of the replica a
        request wakes) times each one's `slots_per_replica`, shared evenly among the ingress
        replicas."""
        routes = self._routes(spec.name)
        replicas = max(1, routes.replica_count() if routes is not None else 0)
        return max(1, math.ceil(replicas * self._slot_share(spec)))

    def _slot_share(self, spec: ModelSpec) -> float:
        """This ingress replica's share of each engine replica's slots (the router keeps its
        requests on a replica below it, `capacity`'s split per replica)."""
        return slots_per_replica(spec) / self.config.server.ingress_replicas

    def gate_of(self, endpoint: Endpoint, request: OpenAIRequest) -> AdmissionGate | None:
        """The admission gate an HTTP request waits at: None without tenants, and for the
        endpoints that take no engine slot (tokenize, detokenize)."""
        if not self.gates or endpoint not in GATED:
            return None
        spec = self.config.model(request.model)
        return self.gates.get(spec.name) if spec is not None else None

    def priority_of(self, tenant: str | None) -> int:
        """vLLM's `priority` for a tenant's requests (keys without a tenant: `standard`)."""
        rules = self.tenants.get(tenant) if tenant is not None else None
        return rules.priority_value if rules is not None else STANDARD_PRIORITY

    def _engine_body(
        self,
        spec: ModelSpec,
        endpoint: Endpoint,
        request: OpenAIRequest,
        tenant: str | None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        check_task(spec, endpoint, request.model)
        body = request.engine_body(engine_model(spec, request.model))
        if spec.name in self._priority and endpoint in GATED:  # a client's own is replaced
            body["priority"] = self.priority_of(tenant) if priority is None else priority
        return body

    # -- checks -------------------------------------------------------------------------------
    def admit(self, key_id: str, request: OpenAIRequest, tenant: str | None = None) -> Lease:
        """The request's checks (its model, the tenant's access and output bounds, the limits),
        then the per-key (or the tenant's) rate, token and concurrency limits: 429 with
        Retry-After when over. A request refused by a check is not charged."""
        return self.limiter.acquire(key_id, self._admission_tokens(request, tenant), tenant)

    async def admit_shared(
        self, key_id: str, request: OpenAIRequest, tenant: str | None = None
    ) -> Lease:
        """`admit`, first waiting (one exchange, bounded) for the cluster's quota ledger when
        this replica's slice of the tenant's budget is short, instead of refusing."""
        spec = self._admission_checks(request, tenant)
        await self._count_async(spec, request)
        tokens = request.estimated_tokens()
        await self.limiter.ready(key_id, tokens, tenant)
        return self.limiter.acquire(key_id, tokens, tenant)

    def _admission_tokens(self, request: OpenAIRequest, tenant: str | None) -> int:
        """The request's checks (see `admit`), then the tokens it is charged at admission:
        its prompt counted with the model's tokenizer when this ingress has it (else
        estimated), plus its output bound for each sequence (`SamplingRequest.charge`)."""
        spec = self._admission_checks(request, tenant)
        counter = self._counter(spec, request)
        if counter is not None:
            self._count(counter, request)
        return request.estimated_tokens()

    def check(self, request: OpenAIRequest, tenant: str | None = None) -> ModelSpec:
        """A request's checks without a charge (a batch's, at creation): its model, the
        tenant's access and output bounds (a default output length set on it), the limits."""
        return self._admission_checks(request, tenant)

    def _admission_checks(self, request: OpenAIRequest, tenant: str | None) -> ModelSpec:
        spec = self.resolve(request.model, tenant)
        if isinstance(request, PoolingRequest):  # before any charge or wait
            check_task(spec, request.ENDPOINT, request.model)
        rules = self.tenants.get(tenant) if tenant is not None else None
        if rules is not None and isinstance(request, SamplingRequest):
            bound_output(request, rules)
        self.check_limits(request)
        return spec

    # -- prompt tokens, counted with the model's tokenizer ---------------------------------------
    def _counter(self, spec: ModelSpec, request: OpenAIRequest) -> PromptCounter | None:
        """The model's counter when something charges tokens or routes by them, and the
        request is not counted."""
        if not self.tokenizes or request._prompt_tokens is not None:
            return None
        return self.counters.get(spec.name)

    @property
    def tokenizes(self) -> bool:
        """Whether prompts are tokenized here: to charge them, or to route them."""
        return self.counts_tokens or self.routes_by_tokens

    def _count(self, counter: PromptCounter, request: OpenAIRequest) -> None:
        try:
            ids = counter.token_ids(request) if self.routes_by_tokens else None
            request.counted(len(ids) if ids is not None else counter.count(request), ids)
        except Exception:  # the estimate applies; a counter that fails is not the caller's
            if not self._count_failed:
                self._count_failed = True
                logger.exception("counting prompt tokens failed; estimating them instead")

    async def _count_async(self, spec: ModelSpec, request: OpenAIRequest) -> None:
        """`_count`, in a thread for a long prompt (the tokenizer takes about 0.3 µs a
        character: milliseconds the event loop should not wait)."""
        counter = self._counter(spec, request)
        if counter is None:
            return
        if approx_tokens(request.prompt_input()) > LONG_PROMPT_TOKENS:
            await asyncio.to_thread(self._count, counter, request)
        else:
            self._count(counter, request)

    def fetch_tokenizers(self) -> None:
        """Fetch each model's tokenizer from one of its engine replicas, in the background
        (when something charges tokens): `EngineServer.tokenizer_spec`. Not for a model
        scaled to zero until a replica runs (the fetch never wakes one)."""
        if not self.tokenizes or self._fetches:
            return
        loop = asyncio.get_running_loop()
        self._fetches = [
            loop.create_task(self._fetch_tokenizer(spec))
            for spec in self.config.models
            if spec.name in self._handles
        ]

    def stop_fetching(self) -> None:
        for task in self._fetches:
            task.cancel()

    async def _fetch_tokenizer(self, spec: ModelSpec) -> None:
        handle = self._handles[spec.name].options(method_name=TOKENIZER_METHOD, stream=False)
        error: Exception | None = None
        for attempt in range(TOKENIZER_ATTEMPTS):
            while (routes := self._routes(spec.name)) is None or routes.replica_count() == 0:
                await asyncio.sleep(1.0)
            try:
                answer = await asyncio.wait_for(handle.remote(), TOKENIZER_TIMEOUT_S)
                self.counters[spec.name] = await asyncio.to_thread(PromptCounter.from_spec, answer)
            except Exception as exc:  # an engine without the method (a simulated one), ...
                error = exc
                await asyncio.sleep(5.0 * (attempt + 1))
                continue
            logger.info("model %r: prompt tokens counted with its tokenizer", spec.name)
            return
        logger.warning(
            "model %r: no tokenizer from its engine (%s: %s); prompt tokens are estimated",
            spec.name, type(error).__name__, str(error)[:200],
        )  # fmt: skip

    def check_limits(self, request: OpenAIRequest) -> None:
        limits = self.config.limits
        if not isinstance(request, SamplingRequest):
            return
        if request.n > limits.max_n:
            raise OpenAIError(400, f"n={request.n} exceeds the limit of {limits.max_n}", param="n")
        if limits.max_tokens is not None:
            _cap_output(request, limits.max_tokens)

    def _checked(self, request: OpenAIRequest) -> ModelSpec:
        spec = self.resolve(request.model)
        self.check_limits(request)
        return spec

    # -- HTTP: relayed to a replica's port ------------------------------------------------------
    async def relay_http(
        self,
        endpoint: Endpoint,
        request: OpenAIRequest,
        *,
        send: Send,
        request_id: str,
        session: str | None = None,
        exchange: Exchange | None = None,
        private: bool = False,
        tenant: str | None = None,
        receipt: bool = False,
    ) -> None:
        """Answer one HTTP request from a replica of its model (see the module docstring);
        `private` (tenants configured): the answer shows only the routing policy; `tenant`:
        whose `priority` the engine request carries (when its engines schedule by it);
        `receipt`: the routing decision carries a route receipt (`app.routing.receipts`)."""
        exchange = exchange or Exchange()
        spec = self._checked(request)
        routes = await self._routes_of(spec)
        body = self._engine_body(spec, endpoint, request, tenant, exchange.priority)
        stream = exchange.stream = self._migratable(spec, endpoint, request)
        if stream is not None:
            body["return_token_ids"] = True
        payload = json.dumps(body, separators=(",", ":")).encode()
        if self.routes_by_tokens:
            await self._count_async(spec, request)
        view = exchange.view = view_of_body(
            body, model=spec.name, session_key=session, token_ids=request._prompt_ids,
            lora_adapter=adapter_of(spec, body["model"]),
        )  # fmt: skip
        view.receipt = receipt
        failed: set[str] = set()
        slots = self._slot_share(spec) if spec.name in self.gates else None
        failures = 0
        while True:
            routed = routes.route(view, exclude=failed, slots=slots)
            if routed is None:
                break
            trace = exchange.trace
            number = failures + exchange.preemptions
            span = trace.attempt(routed.decision, number, routed.url, private) if trace else None
            answered = False
            try:  # the router's count of the request is released however the attempt ends
                path = ENGINE_PATHS[endpoint]
                answered = await self._attempt(routes, routed, path, payload, request_id, send,
                                               exchange, private, span)  # fmt: skip
            finally:
                routes.finish(routed)
                if span is not None:
                    end_attempt(span, answered)
            if answered:
                if stream is not None and not stream.done:  # it broke after its first byte
                    if not exchange.preempted:  # (a preempted one's replica did not fail)
                        failed.add(routed.replica_id)
                    await self._migrate(routes, endpoint, body, send, request_id, exchange,
                                        failed, session, private, slots)  # fmt: skip
                return
            if exchange.preempted:  # stopped before its answer: no failure, and no retry used
                exchange.preempted = False
                assert exchange.slot is not None
                await exchange.slot.resume()
                continue
            failed.add(routed.replica_id)
            failures += 1
            if failures > self.config.server.retries:
                break
            await asyncio.sleep(backoff_s(failures - 1))
        raise OpenAIError(503, "the model's replicas failed; retry", code=REPLICA_FAILED)

    def _migratable(
        self, spec: ModelSpec, endpoint: Endpoint, request: OpenAIRequest
    ) -> Stream | None:
        if not self.config.server.migrate_streams:
            return None
        return migratable(endpoint, request, spec.engine_args)

    async def _migrate(
        self,
        routes: EngineRoutes,
        endpoint: Endpoint,
        body: dict[str, Any],
        send: Send,
        request_id: str,
        exchange: Exchange,
        failed: set[str],
        session: str | None,
        private: bool,
        slots: float | None = None,
    ) -> None:
        """Go on with a stream that broke after its first byte on other replicas, at most
        `retries` times (`app.ingress.migration`): the continuation's chunks, then the ending
        (usage, the migration's comment, [DONE]); the stream's error event and [DONE] when no
        replica can. A stream whose client got no chunk yet starts again on another replica.
        A preempted stream (its slot taken by a more important waiter) first waits for a slot
        again, then goes on at any replica; that is no retry."""
        stream = exchange.stream
        assert stream is not None
        failures, broke = 0, not exchange.preempted  # (a preempted stream is no migration)
        while True:
            if stream.done or (stream.started and (stream.complete or not stream.can_continue())):
                break
            preempted = exchange.preempted
            if preempted:
                exchange.preempted = False
                assert exchange.slot is not None
                await exchange.slot.resume()
            elif failures < self.config.server.retries:
                await asyncio.sleep(backoff_s(failures))
                failures += 1
            else:
                break
            again = not stream.started  # nothing of it reached the client
            next_body = body if again else stream.continuation(body)
            first = exchange.view  # the request's own (its model and adapter)
            assert first is not None
            routed = routes.route(view_of_body(next_body, model=first.model, session_key=session,
                                               lora_adapter=first.lora_adapter),
                                  exclude=failed, slots=slots)  # fmt: skip
            if routed is None:
                break
            logger.log(logging.INFO if preempted else logging.WARNING,
                       "request %s: stream %s after %d tokens; going on at replica %s",
                       request_id, "preempted" if preempted else "broke",
                       len(stream.generated), routed.replica_id)  # fmt: skip
            stream.resume(routed.replica_id, again=again)
            trace = exchange.trace
            number = failures + exchange.preemptions
            span = None if trace is None else trace.attempt(routed.decision, number, routed.url,
                                                            private)  # fmt: skip
            payload = json.dumps(next_body, separators=(",", ":")).encode()
            path = ENGINE_PATHS[endpoint if again else "completions"]
            answered = False
            try:
                answered = await self._attempt(routes, routed, path, payload, request_id, send,
                                               exchange, private, span, head=False)  # fmt: skip
            finally:
                routes.finish(routed)
                if span is not None:
                    end_attempt(span, answered)
            if not stream.done and not exchange.preempted:
                failed.add(routed.replica_id)
                broke = True
        if stream.done and not stream.continuing:  # started again: it ended as any stream
            stream.outcome = "continued" if broke else None
            return
        if stream.started and (stream.done or stream.complete):
            stream.outcome = "continued" if broke else None
            exchange.told_usage(stream.total_usage())
            ending = stream.ending(private)
            await send({"type": "http.response.body", "body": ending, "more_body": True})
        else:
            stream.outcome = "failed"
            failure = stream.error_event or _event(error_body(
                502, "the engine's stream broke off", code="engine_error"))  # fmt: skip
            await send({"type": "http.response.body", "body": failure + DONE_EVENT,
                        "more_body": True})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})

    async def _attempt(
        self,
        routes: EngineRoutes,
        routed: Any,
        path: str,
        payload: bytes,
        request_id: str,
        send: Send,
        exchange: Exchange,
        private: bool = False,
        span: Span | None = None,
        *,
        head: bool = True,
    ) -> bool:
        """Relay the request to the routed replica's `path`; False when it failed before
        answering (not reachable, or its engine is gone: another replica may answer), or was
        stopped before its answer began (`exchange.preempted`). `span`: the attempt's trace
        span, whose `traceparent` the engine request carries. A migratable stream
        (`exchange.stream`) goes event by event, and with a slot it offers the slot while the
        attempt runs (`_Offer`); a slot is told where its request is (`Slot.placed`); `head`:
        the answer's head is still to send (not for a continuation)."""
        traceparent = RequestTrace.traceparent(span) if span is not None else None
        slot = exchange.slot
        if slot is not None:  # (the gate stops a holder beside the fewest prefills first)
            slot.placed(routed.replica_id)
        offer = _Offer(exchange) if slot is not None and exchange.stream is not None else None
        try:
            response = await self.relay.send(routed.url, path, payload, request_id, traceparent,
                                             offer.sent if offer else None)  # fmt: skip
        except Stopped:  # preempted before its answer began (e.g. in its prefill)
            if slot is not None:
                slot.placed(None)
            return False
        except RelayError as exc:
            if slot is not None:
                slot.placed(None)
            if offer is not None:
                offer.withdraw()
            if exc.timed_out and head:  # (a continuation's: the client has the answer's head)
                raise _timed_out(self.relay.timeout_s) from None
            logger.warning(
                "request %s: replica %s failed before answering: %s",
                request_id, routed.replica_id, exc,
            )  # fmt: skip
            return False
        try:
            if await engine_unavailable(response):
                logger.warning(
                    "request %s: replica %s has no engine; retrying elsewhere",
                    request_id, routed.replica_id,
                )  # fmt: skip
                return False
            if head:  # the answer's routing (a continuation's is in the migration's comment)
                exchange.decision = routed.decision

            def first_byte() -> None:
                if exchange.first_byte_at is None:  # a continuation's is not the answer's
                    exchange.first_byte_at = time.perf_counter()
                routes.first_token(routed)
                if slot is not None:
                    slot.placed(routed.replica_id, answering=True)
                if span is not None:
                    span.add_event("first_token")

            headers = route_headers(routed.decision, private)
            stream = exchange.stream
            streamed = response.status == 200 and response.content_type == "text/event-stream"
            if not head and not streamed:  # a continuation refused: the client has a head
                return False
            if stream is None or not streamed:
                if offer is not None:  # a whole answer is not stopped
                    offer.withdraw()
                if response.content_type != "text/event-stream":  # read whole before any byte
                    try:  # goes to the client: one that breaks off may go to another replica
                        await response.read()
                    except TimeoutError:
                        raise _timed_out(self.relay.timeout_s) from None
                    except OSError as exc:
                        logger.warning(
                            "request %s: replica %s broke off its answer: %s: %s",
                            request_id, routed.replica_id, type(exc).__name__, exc,
                        )  # fmt: skip
                        return False
                await pass_through(response, send, headers, first_byte, exchange.told_usage)
                return True
            if head:
                stream.replicas.append(routed.replica_id)
                await send(stream_head(response, headers))
            await relay_events(response, send, stream, first_byte, exchange.told_usage)
            return True
        finally:
            if slot is not None:
                slot.placed(None)
            if offer is not None:
                offer.withdraw()
            response.release()

    async def wait_for_routers(self, timeout_s: float, models: list[str] | None = None) -> bool:
        """Wait until each model's router in this process knows its running replicas (Serve
        starts the routers when the ingress makes its handles, and tells them shortly after);
        whether they all do within `timeout_s`."""
        names = models or [spec.name for spec in self.config.models]
        deadline = time.monotonic() + timeout_s
        while True:
            routers = [self._routes(name) for name in names]
            if all(r is not None and r.replicas_known for r in routers):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def _routes_of(self, spec: ModelSpec) -> EngineRoutes:
        """The model's router, once it sees a running replica. A model that scales to zero is
        woken by a handle call (Serve queues it and scales the model up); any other model
        without a replica is a 503."""
        routes = self._routes(spec.name)
        if routes is None or not routes.replicas_known:  # a new ingress replica's first moments
            await self.wait_for_routers(ROUTER_WAIT_S, models=[spec.name])
            routes = self._routes(spec.name)
        if routes is not None and routes.replica_count() > 0:
            return routes
        if not self.state(spec).scales_to_zero:
            raise _not_ready(spec)
        wake = self._handles[spec.name].options(method_name="check_health", stream=False)

        async def woken() -> EngineRoutes:
            await wake.remote()
            while True:  # the router hears of the replica shortly after
                routes = self._routes(spec.name)
                if routes is not None and routes.replica_count() > 0:
                    return routes
                await asyncio.sleep(0.1)

        timeout_s = self.config.server.request_timeout_s
        try:
            return await asyncio.wait_for(woken(), timeout_s)
        except asyncio.TimeoutError:
            raise _timed_out(timeout_s) from None

    # -- handle calls: through the engine deployment's Serve handle -----------------------------
    async def call(
        self,
        endpoint: Endpoint,
        request: OpenAIRequest,
        tenant: str | None = None,
        *,
        priority: int | None = None,
    ) -> dict[str, Any]:
        """A non-streaming request's JSON answer; `tenant`: whose `priority` the engine request
        carries (when its engines schedule by it), unless `priority` is given."""
        async for item in self._items(endpoint, request, tenant, priority):
            if "body" in item:
                return item["body"]
        raise OpenAIError(500, "the engine answered a non-streaming request with a stream")

    async def stream(
        self, endpoint: Endpoint, request: OpenAIRequest, tenant: str | None = None
    ) -> AsyncIterator[dict]:
        """A streaming request's chunks, as dicts (`tenant` as in `call`)."""
        async for item in self._items(endpoint, request, tenant):
            if "chunk" in item:
                yield item["chunk"]
            elif "error" in item:
                raise OpenAIError.from_body(item["status"], item)

    async def _items(
        self,
        endpoint: Endpoint,
        request: OpenAIRequest,
        tenant: str | None,
        priority: int | None = None,
    ) -> AsyncIterator[EngineItem]:
        spec = self._checked(request)
        state = self.state(spec)
        if not state.ready and not state.scales_to_zero:
            raise _not_ready(spec)
        handle = self._handles[spec.name]
        body = self._engine_body(spec, endpoint, request, tenant, priority)  # not gated (above)
        for attempt in range(self.config.server.retries + 1):
            items = handle.remote(endpoint, body)
            try:
                first = await asyncio.wait_for(anext(items), self.config.server.request_timeout_s)
            except StopAsyncIteration:
                raise OpenAIError(500, "the engine returned no answer") from None
            except asyncio.TimeoutError:
                items.cancel()
                raise _timed_out(self.config.server.request_timeout_s) from None
            except Exception as exc:  # nothing was sent yet: another replica may answer
                error = engine_failure(exc)
                if error.code != REPLICA_FAILED or attempt == self.config.server.retries:
                    raise error from None
                await asyncio.sleep(backoff_s(attempt))
                continue
            if "error" in first:
                gone = first["error"].get("code") == ENGINE_UNAVAILABLE
                if gone and attempt < self.config.server.retries:  # another replica may answer
                    await asyncio.sleep(backoff_s(attempt))
                    continue
                raise OpenAIError.from_body(first["status"], first)
            yield first
            async for item in items:
                yield item
            return


def engine_model(spec: ModelSpec, name: str) -> str:
    """The `model` an engine request names: the adapter a client named, else the model's
    canonical name."""
    return adapter_of(spec, name) or spec.name


def adapter_of(spec: ModelSpec, name: str) -> str | None:
    """The LoRA adapter `name` is, of `spec` (None: the base model)."""
    return name if name in spec.adapter_names else None


def check_task(spec: ModelSpec, endpoint: Endpoint, name: str) -> None:
    """A 400 for a pooling endpoint (score, rerank) asked of a model whose engine args make it
    generate. (A model whose runner vLLM picks from its architecture is asked; its engine
    answers the same 400 when it cannot score.)"""
    if endpoint in POOLING_ONLY and spec.runner == "generate":
        raise OpenAIError(
            400,
            f"model {name!r} generates text and cannot {endpoint}: /v1/{endpoint} needs a "
            "pooling model (an embedding model or a cross-encoder)",
            param="model",
            code="model_not_supported",
        )


def slots_per_replica(spec: ModelSpec) -> int:
    """Requests one engine replica runs at once: its `max_num_seqs` (engine_args), else vLLM's
    default for its OpenAI server (see `CPU_SEQS_PER_RANK`)."""
    seqs = spec.engine_args.get("max_num_seqs")
    if isinstance(seqs, int) and seqs >= 1:
        return seqs
    return GPU_SEQS if spec.on_gpu else CPU_SEQS_PER_RANK * spec.gpu_workers


def admission_cost(queue: FairQueue, request: OpenAIRequest) -> float:
    """A request's estimated service in the fair queue's units: its prompt (counted with the
    model's tokenizer at admission when the ingress has it, else estimated) and the most
    output it may produce, each at the queue's weight."""
    total = request.estimated_tokens()
    if not isinstance(request, SamplingRequest):
        return queue.service_units(total, 0)
    prompt = min(total, request.prompt_tokens())
    return queue.service_units(prompt, total - prompt)


def route_headers(decision: Decision, private: bool = False) -> list[tuple[bytes, bytes]]:
    """`x-route-policy`, `x-route-replica` and `x-route-reason` of a routing decision, and
    `x-route-receipt` (compact JSON) when it has a receipt; when tenants share the stack
    (`private`) the policy only: the replica, the reason and a receipt depend on the prompts
    other callers sent (a prefix match), so they would tell one of another's."""
    if private:
        return [(b"x-route-policy", decision.policy.encode())]
    headers = [
        (b"x-route-policy", decision.policy.encode()),
        (b"x-route-replica", decision.replica_id.encode()),
        (b"x-route-reason", decision.reason.encode()),
    ]
    if decision.receipt is not None:
        headers.append((b"x-route-receipt", receipt_json(decision.receipt).encode()))
    return headers


def receipt_json(receipt: RouteReceipt) -> str:
    """A receipt as compact JSON (ASCII: a header value)."""
    return json.dumps(receipt.to_json(), separators=(",", ":"))


def bound_output(request: SamplingRequest, tenant: Tenant) -> None:
    """A tenant's output bounds: its default set on a request that gives no output length;
    a request asking for more than its `max_tokens`, a 400 naming the parameter."""
    if request.output_tokens() is None:
        if tenant.output_default is not None:
            request.max_tokens = tenant.output_default
    elif tenant.max_tokens is not None:
        _cap_output(request, tenant.max_tokens)


def _cap_output(request: SamplingRequest, limit: int) -> None:
    tokens = request.output_tokens()
    if tokens is not None and tokens > limit:
        param = "max_tokens" if tokens == request.max_tokens else "max_completion_tokens"
        raise OpenAIError(
            400, f"{param}={tokens} exceeds the limit of {limit}", param=param, code="invalid_value"
        )


def backoff_s(attempt: int) -> float:
    """50 ms doubling per attempt, with jitter, at most 2 s."""
    return min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())


def engine_failure(exc: BaseException) -> OpenAIError:
    """Map a failed handle call to a client error without leaking internals."""
    name = type(exc).__name__
    logger.warning("engine call failed: %s: %s", name, exc)
    if name in {"BackPressureError", "DeploymentUnavailableError"}:
        return OpenAIError(
            503, "the model is overloaded; retry later", code="overloaded",
            headers={"retry-after": "1"},
        )  # fmt: skip
    if name in {"ActorDiedError", "RayActorError", "ActorUnavailableError"}:
        return OpenAIError(503, "the model's replica failed; retry", code=REPLICA_FAILED)
    if name in {"RequestCancelledError", "CancelledError", "TaskCancelledError"}:
        return OpenAIError(503, "the request was cancelled", code="cancelled")
    return OpenAIError(500, "the engine failed to answer", code="engine_error")


def _not_ready(spec: ModelSpec) -> OpenAIError:
    return OpenAIError(
        503, f"model {spec.name!r} has no ready replica yet; retry shortly", code="model_not_ready"
    )


class _Offer:
    """A stream's slot offered to more important waiters (`Slot.stoppable`) from the moment one
    attempt's request is sent until the attempt ends: the engine drops a request whose
    connection closes, in its prefill too, so it can be stopped before its answer begins."""

    __slots__ = ("exchange", "response")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.response: EngineResponse | None = None

    def sent(self, response: EngineResponse) -> None:
        """The request is written (`EnginePool.post`): offer the slot."""
        self.response = response
        assert self.exchange.slot is not None
        self.exchange.slot.stoppable(self.stop)

    def withdraw(self) -> None:
        if self.response is not None and self.exchange.slot is not None:
            self.exchange.slot.stoppable(None)

    def stop(self) -> bool:
        """Stop the stream (the slot's `stop`): only one that can go on from its tokens, or that
        sent none yet; whether it was stopped."""
        exchange, response = self.exchange, self.response
        stream = exchange.stream
        if response is None or stream is None or stream.done:
            return False
        if stream.started and not stream.can_continue():
            return False
        exchange.preempted = True
        exchange.preemptions += 1
        response.abort()
        return True


def _timed_out(timeout_s: float) -> OpenAIError:
    return OpenAIError(504, f"the engine did not answer within {timeout_s:g} s", code="timeout")


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"
