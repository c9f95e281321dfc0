"""Fair admission at the ingress (in-process, in front of engine doubles): with tenants, each
model's requests wait for an engine slot in priority then weighted-token order, a full tenant
queue is a 429 with Retry-After, an expired wait a 503, the slot is settled with the answer's
usage, the engines get each tenant's `priority` (and are started to schedule by it), a tenant
with a deep backlog is demoted, and a more important waiter stops a less important stream,
which goes on from its tokens."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.config import load_config
from app.engines.llm_config import llm_config
from app.ingress.gateway import Gateway, slots_per_replica
from app.routing import RequestView
from benchmarks.toy_model import prompt_ids
from tests.engine_double import LoopbackRoutes, events
from tests.test_auth_limits import bearer
from tests.test_ingress import assert_openai_error, eventually, make_client
from tests.test_metrics import scrape, value
from tests.test_migration import text_of

pytestmark = pytest.mark.anyio
BODY = {"model": "smollm2", "prompt": "hello", "max_tokens": 4}
USAGE = {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}
TENANTS = [
    {"name": "chat", "api_keys": ["sk-chat"], "priority": "interactive"},
    {"name": "eval", "api_keys": ["sk-eval"], "priority": "batch"},
    {"name": "team", "api_keys": ["sk-team"], "weight": 2},
]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _config(cpu_model, *, seqs=1, admission=None, tenants=TENANTS, engine_args=None):
    model = {**cpu_model, "engine_args": {"max_num_seqs": seqs, **(engine_args or {})}}
    return {
        "models": [model, {**cpu_model, "name": "second", "aliases": ["b"]}],
        "auth": {"api_keys": ["sk-plain"], "api_keys_env": None},
        "tenants": tenants,
        "admission": admission or {},
        "server": {"request_timeout_s": 5},
    }


@contextlib.asynccontextmanager
async def admission_client(cpu_model, *, mode="ok", **options):
    config = _config(cpu_model, **options)
    async with make_client(cpu_model, modes={"smollm2": mode}, config=config) as (c, e, _):
        gateway = c._transport.app.gateway  # the app under test, as make_client built it
        yield c, e["smollm2"], gateway


async def post(client, key, body, path="/v1/completions"):
    return await client.post(path, json=body, headers=bearer(key))


async def queued(gate, count: int) -> None:
    """Wait until `count` requests wait at `gate`."""
    await eventually(lambda: len(gate.queue) == count)


def _samples(text: str, prefix: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


# -- order ----------------------------------------------------------------------------------


async def test_saturated_engines_serve_waiters_by_priority_then_arrival(cpu_model):
    async with admission_client(cpu_model, mode="slow") as (client, engine, gateway):
        gate = gateway.gates["smollm2"]
        assert gate.capacity == 1  # one replica, max_num_seqs 1
        first = asyncio.ensure_future(post(client, "sk-eval", {**BODY, "prompt": "first"}))
        await eventually(lambda: len(engine.calls) == 1)
        waiting = []
        for key, prompt in (("sk-eval", "b1"), ("sk-plain", "s1"), ("sk-eval", "b2")):
            waiting.append(asyncio.ensure_future(post(client, key, {**BODY, "prompt": prompt})))
            await queued(gate, len(waiting))
        waiting.append(asyncio.ensure_future(post(client, "sk-chat", {**BODY, "prompt": "i1"})))
        await eventually(lambda: len(gate.queue) == 4)
        assert gate.in_flight == 1 and len(engine.calls) == 1  # the engine took none of them
        answers = await asyncio.gather(first, *waiting)
        assert [a.status_code for a in answers] == [200] * 5
        order = [(body["prompt"], body["priority"]) for _, body in engine.calls]
        assert order == [("first", 20), ("i1", 0), ("s1", 10), ("b1", 20), ("b2", 20)]
        assert gate.in_flight == 0 and len(gate.queue) == 0
        text = (await client.get("/metrics")).text
    waited = _samples(text, "vrstack_tenant_queue_seconds_count")
    assert waited == {
        'vrstack_tenant_queue_seconds_count{tenant="chat"}': 1,
        'vrstack_tenant_queue_seconds_count{tenant="eval"}': 3,
        'vrstack_tenant_queue_seconds_count{tenant="team"}': 0,
        'vrstack_tenant_queue_seconds_count{tenant="anonymous"}': 1,
    }
    slow = _samples(text, 'vrstack_tenant_queue_seconds_bucket{le="0.1",tenant="eval"}')
    assert list(slow.values()) == [1]  # b1 and b2 waited for the slow answers before them


async def test_within_a_class_the_tenant_with_less_weighted_service_goes_first(cpu_model):
    tenants = [
        {"name": "light", "api_keys": ["sk-light"]},
        {"name": "heavy", "api_keys": ["sk-heavy"]},
    ]
    async with admission_client(cpu_model, mode="slow", tenants=tenants) as (client, engine, gw):
        gate = gw.gates["smollm2"]
        big = {**BODY, "max_tokens": 200}  # its counter rises by its estimate at dispatch
        first = asyncio.ensure_future(post(client, "sk-heavy", {**big, "prompt": "h0"}))
        await eventually(lambda: len(engine.calls) == 1)
        tasks = []
        sent = [("sk-heavy", {**big, "prompt": "h1"}), ("sk-heavy", {**big, "prompt": "h2"})]
        sent += [("sk-light", {**BODY, "prompt": "l1"}), ("sk-light", {**BODY, "prompt": "l2"})]
        for key, body in sent:
            tasks.append(asyncio.ensure_future(post(client, key, body)))
            await queued(gate, len(tasks))
        assert [a.status_code for a in await asyncio.gather(first, *tasks)] == [200] * 5
        # light starts level with heavy (no credit for idle time), then its small requests
        # cost less than heavy's big ones: both go before heavy's second (FCFS: h1 h2 l1 l2)
        assert [body["prompt"] for _, body in engine.calls] == ["h0", "h1", "l1", "l2", "h2"]
        assert {body["priority"] for _, body in engine.calls} == {10}


async def test_capacity_follows_the_replicas_and_their_slots(cpu_model):
    async with admission_client(cpu_model, seqs=3) as (_, _, gateway):
        spec = gateway.config.model("smollm2")
        assert gateway.capacity(spec) == gateway.gates["smollm2"].capacity == 3
        routes = gateway._routes("smollm2")
        routes.replicas.append(routes.replicas[0])  # the model scaled to a second replica
        assert gateway.gates["smollm2"].capacity == 6
        routes.replicas.clear()  # scaled to zero: the slots of the replica a request wakes
        assert gateway.gates["smollm2"].capacity == 3
    config = load_config({**_config(cpu_model, seqs=5), "server": {"ingress_replicas": 2}})
    gateway = Gateway(config, {}, routes=lambda name: None)
    assert gateway.capacity(config.models[0]) == 3  # 5 slots shared by 2 ingress replicas
    assert slots_per_replica(config.models[1]) == 128  # vLLM's CPU default for its server
    gpu = load_config({"models": [{**cpu_model, "resources": {"gpu": 1}}]}).models[0]
    assert slots_per_replica(gpu) == 256


# -- refusals -------------------------------------------------------------------------------


async def test_a_full_tenant_queue_is_429_with_retry_after(cpu_model):
    admission = {"max_queue_per_tenant": 1}
    async with admission_client(cpu_model, mode="slow", admission=admission) as (client, e, gw):
        gate = gw.gates["smollm2"]
        running = asyncio.ensure_future(post(client, "sk-eval", BODY))
        await eventually(lambda: gate.in_flight == 1)
        queued = asyncio.ensure_future(post(client, "sk-eval", BODY))
        await eventually(lambda: len(gate.queue) == 1)
        refused = await post(client, "sk-eval", BODY)
        error = assert_openai_error(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and error["type"]
        assert "tenant 'eval'" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        other = asyncio.ensure_future(post(client, "sk-chat", BODY))  # its own queue: waits
        await eventually(lambda: len(gate.queue) == 2)
        answers = await asyncio.gather(running, queued, other)
        assert [a.status_code for a in answers] == [200] * 3 and len(e.calls) == 3
        text = (await client.get("/metrics")).text
    refusals = _samples(text, "vrstack_tenant_queue_rejections_total")
    assert refusals['vrstack_tenant_queue_rejections_total{reason="queue_full",tenant="eval"}'] == 1
    assert sum(refusals.values()) == 1
    statuses = _samples(text, "vrstack_tenant_requests_total")
    assert statuses['vrstack_tenant_requests_total{status="429",tenant="eval"}'] == 1


async def test_a_wait_past_max_wait_is_503_overloaded(cpu_model):
    admission = {"max_wait_s": 0.1}
    async with admission_client(cpu_model, mode="slow", admission=admission) as (client, e, gw):
        running = asyncio.ensure_future(post(client, "sk-chat", BODY))
        await eventually(lambda: gw.gates["smollm2"].in_flight == 1)
        expired = await post(client, "sk-eval", BODY)
        error = assert_openai_error(expired, 503)
        assert error["code"] == "overloaded" and expired.headers["retry-after"] == "1"
        assert (await running).status_code == 200 and len(e.calls) == 1
        assert len(gw.gates["smollm2"].queue) == 0 and gw.gates["smollm2"].in_flight == 0
        text = (await client.get("/metrics")).text
    refusals = _samples(text, "vrstack_tenant_queue_rejections_total")
    assert refusals['vrstack_tenant_queue_rejections_total{reason="expired",tenant="eval"}'] == 1


async def test_a_client_leaving_while_queued_leaves_the_queue(cpu_model):
    async with admission_client(cpu_model, mode="slow") as (client, engine, gw):
        gate = gw.gates["smollm2"]
        running = asyncio.ensure_future(post(client, "sk-chat", BODY))
        await eventually(lambda: gate.in_flight == 1)
        leaving = asyncio.ensure_future(post(client, "sk-eval", {**BODY, "prompt": "gone"}))
        await eventually(lambda: len(gate.queue) == 1)
        leaving.cancel()
        await eventually(lambda: len(gate.queue) == 0)
        assert (await running).status_code == 200
        assert (await post(client, "sk-eval", BODY)).status_code == 200
        assert [body["prompt"] for _, body in engine.calls] == ["hello", "hello"]
        assert gate.in_flight == 0


# -- settlement -----------------------------------------------------------------------------


async def test_the_slot_is_settled_with_the_answers_usage(cpu_model):
    async with admission_client(cpu_model) as (client, engine, gateway):
        queue = gateway.gates["smollm2"].queue
        engine.usage = USAGE  # 2 prompt + 3 output tokens: 2 x 1 + 3 x 2 service units
        assert (await post(client, "sk-team", {**BODY, "max_tokens": 90})).status_code == 200
        assert queue.counter("team") == pytest.approx((2 + 3 * 2) / 2)  # weight 2
        assert (await post(client, "sk-eval", {**BODY, "max_tokens": 90})).status_code == 200
        assert queue.counter("eval") == pytest.approx(8)
        stream = {**BODY, "max_tokens": 90, "stream": True}  # settled with its usage too
        assert (await post(client, "sk-eval", stream)).status_code == 200
        assert queue.counter("eval") == pytest.approx(8 + 8)
        engine.usage = None  # no usage from the engine: the estimate holds
        assert (await post(client, "sk-eval", stream)).status_code == 200
        assert queue.counter("eval") == pytest.approx(8 + 8 + 2 + 90 * 2)
        engine.usage = USAGE
        chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
        path = "/v1/chat/completions"
        assert (await post(client, "sk-chat", {**chat, "max_tokens": 7}, path)).status_code == 200
        # lifted to the last backlogged minimum (eval's 16: no credit for idle time), plus usage
        assert queue.counter("chat") == pytest.approx(16 + 8)
        assert engine.calls[-1][1]["priority"] == 0
    async with admission_client(cpu_model, mode="error400") as (client, _, gateway):
        assert_openai_error(await post(client, "sk-eval", {**BODY, "max_tokens": 90}), 400)
        assert gateway.gates["smollm2"].queue.counter("eval") == 0  # refused: no service


# -- priority into vLLM ---------------------------------------------------------------------


async def test_engine_requests_carry_the_tenants_priority(cpu_model):
    async with admission_client(cpu_model, seqs=8) as (client, engine, gateway):
        for key, priority in (("sk-chat", 0), ("sk-eval", 20), ("sk-team", 10), ("sk-plain", 10)):
            claimed = {**BODY, "priority": -5}  # a client's own priority is not kept
            assert (await post(client, key, claimed)).status_code == 200
            assert engine.calls[-1][1]["priority"] == priority
        embed = {"model": "smollm2", "input": "hello"}
        assert (await post(client, "sk-chat", embed, "/v1/embeddings")).status_code == 200
        assert engine.calls[-1][1]["priority"] == 0
        tokenize = {"model": "smollm2", "prompt": "hello"}
        assert (await post(client, "sk-chat", tokenize, "/tokenize")).status_code == 200
        assert "priority" not in engine.calls[-1][1]  # no engine slot, no scheduling
        assert gateway.gates["smollm2"].capacity == 8
    fcfs = {"scheduling_policy": "fcfs"}  # the operator's choice holds: no priority sent
    async with admission_client(cpu_model, engine_args=fcfs) as (client, engine, gateway):
        assert (await post(client, "sk-chat", BODY)).status_code == 200
        assert "priority" not in engine.calls[-1][1]
        assert set(gateway.gates) == {"smollm2", "second"}  # fair admission still holds


async def test_a_tenant_with_a_deep_backlog_is_demoted_in_the_queue_and_the_engine(cpu_model):
    admission = {"demote_backlog": 1}
    async with admission_client(cpu_model, mode="slow", admission=admission) as (client, e, gw):
        gate = gw.gates["smollm2"]
        first = asyncio.ensure_future(post(client, "sk-team", {**BODY, "prompt": "t0"}))
        await eventually(lambda: gate.in_flight == 1)
        tasks = []
        for key, prompt in (("sk-team", "t1"), ("sk-team", "t2"), ("sk-plain", "s1")):
            tasks.append(asyncio.ensure_future(post(client, key, {**BODY, "prompt": prompt})))
            await queued(gate, len(tasks))
        assert [a.status_code for a in await asyncio.gather(first, *tasks)] == [200] * 4
    order = [(body["prompt"], body["priority"]) for _, body in e.calls]
    # t2: team had 1 waiting; t1, queued before, stands one class lower too once t2 waits
    assert order == [("t0", 10), ("s1", 10), ("t1", 10), ("t2", 11)]


STREAM = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}


async def _stopped_by_chat(cpu_model, double, *, after_s=0.0):
    """An `eval` (batch class) stream that holds the one slot, stopped `after_s` after it was
    sent by a `chat` (interactive) request: the uninterrupted stream's events (of `team`), the
    stopped one's answer, its engine, the gate, and the metrics after."""
    async with make_client(cpu_model, config=_config(cpu_model), double=double) as (c, e, _):
        engine, gate = e["smollm2"], c._transport.app.gateway.gates["smollm2"]
        expected = events((await post(c, "sk-team", STREAM)).text)  # uninterrupted
        engine.calls.clear()
        batch = asyncio.ensure_future(post(c, "sk-eval", STREAM))
        await eventually(lambda: any(slot.stop is not None for slot in gate.holding))
        await asyncio.sleep(after_s)
        chat = await post(c, "sk-chat", {**BODY, "prompt": "hi"})  # one slot: batch's
        assert chat.status_code == 200
        answer = await batch
        samples = await scrape(c)
    got = events(answer.text)
    assert answer.status_code == 200 and got[-1] == "[DONE]"
    assert text_of(got) == text_of(expected) and len(text_of(got).split()) == 8
    assert not [g for g in got if isinstance(g, dict) and "error" in g]
    assert value(samples, "vrstack_tenant_preemptions_total", tenant="eval") == 1
    assert value(samples, "vrstack_tenant_preemptions_total", tenant="team") == 0
    assert value(samples, "vrstack_stream_migrations_total") == 0  # no replica failed
    assert gate.in_flight == 0 and not gate.holding and gate.stopping == 0
    return engine


async def test_a_more_important_waiter_stops_a_stream_which_goes_on_exactly(cpu_model):
    double = {"model": True, "tokens": 8, "token_delay": 0.05}
    engine = await _stopped_by_chat(cpu_model, double, after_s=0.12)  # a few tokens out
    (_, started), (_, interactive), (endpoint, continued) = engine.calls
    assert started["priority"] == 20 and interactive["prompt"] == "hi"
    assert interactive["priority"] == 0
    sent = 8 - continued["max_tokens"]  # the continuation: the prompt's ids and what was sent
    assert endpoint == "completions" and 0 < sent < 8 and continued["priority"] == 20
    assert len(continued["prompt"]) == len(prompt_ids(STREAM)) + sent


async def test_a_stream_stopped_in_its_prefill_starts_again_from_the_start(cpu_model):
    double = {"model": True, "tokens": 8, "first_delay": 0.4}  # no head before its prefill
    engine = await _stopped_by_chat(cpu_model, double)
    (_, started), (_, interactive), (endpoint, again) = engine.calls
    assert interactive["prompt"] == "hi" and engine.cancelled == 1  # the first one's prefill
    assert endpoint == "completions" and again == started  # the same request, from the start


async def test_a_stream_already_answering_is_stopped_before_one_in_its_prefill(cpu_model):
    double = {"model": True, "tokens": 8, "first_delay": 0.3, "token_delay": 0.05}
    config = _config(cpu_model, seqs=2)
    async with make_client(cpu_model, config=config, double=double) as (c, e, _):
        engine, gate = e["smollm2"], c._transport.app.gateway.gates["smollm2"]
        answering = {**STREAM, "prompt": "the first"}
        first = asyncio.ensure_future(post(c, "sk-eval", answering))
        await eventually(lambda: any(slot.answering for slot in gate.holding))
        second = asyncio.ensure_future(post(c, "sk-eval", {**STREAM, "prompt": "the second"}))
        await eventually(lambda: sum(slot.stop is not None for slot in gate.holding) == 2)
        # the second, granted last, is in its prefill: stopping it would lose that prefill
        chat = await post(c, "sk-chat", {**BODY, "prompt": "hi"})
        answers = await asyncio.gather(first, second)
    assert chat.status_code == 200 and [a.status_code for a in answers] == [200, 200]
    (_, a), (_, b), (_, interactive), (endpoint, continued) = engine.calls
    assert (a["prompt"], b["prompt"], interactive["prompt"]) == ("the first", "the second", "hi")
    sent = 8 - continued["max_tokens"]  # the first goes on from its tokens
    assert endpoint == "completions" and 0 < sent < 8
    assert len(continued["prompt"]) == len(prompt_ids(answering)) + sent
    assert engine.cancelled == 1  # the first's stream; the second's prefill went on


async def test_a_slot_tells_the_gate_the_replica_of_its_request_and_when_it_answers(cpu_model):
    """What the gate orders its victims by (`Slot.placed`): where each holder's request is,
    and whether that engine is past its prefill."""
    double = {"model": True, "tokens": 6, "first_delay": 0.3, "token_delay": 0.05}
    async with make_client(cpu_model, config=_config(cpu_model, seqs=2), double=double) as (
        c, _, stack,
    ):  # fmt: skip
        routes, gate = stack.routes["smollm2"], c._transport.app.gateway.gates["smollm2"]
        streamed = asyncio.ensure_future(post(c, "sk-eval", STREAM))
        await eventually(lambda: len(routes.routed) == 1)
        (slot,) = gate.holding
        assert slot.place == routes.routed[0].replica_id and not slot.answering  # its prefill
        await eventually(lambda: slot.answering)
        assert slot.place == routes.routed[0].replica_id
        answer = await streamed
    assert answer.status_code == 200 and not gate.holding
    assert slot.place is None and not slot.answering  # its attempt ended


async def test_admitted_requests_go_to_replicas_with_a_free_slot(cpu_model):
    shared = "You are a helpful assistant. " * 40  # a prefix the router would keep together
    double = {"model": True, "tokens": 4, "first_delay": 0.2}
    async with make_client(cpu_model, config=_config(cpu_model), double=double) as (c, _, stack):
        url = stack.routes["smollm2"].replicas[0].replica_metadata["url"]
        stack.routes["smollm2"] = routes = LoopbackRoutes("smollm2", [url, url])  # 1 slot each
        answers = await asyncio.gather(
            *(post(c, key, {**STREAM, "prompt": shared + key}) for key in ("sk-team", "sk-eval"))
        )
    assert [a.status_code for a in answers] == [200, 200]
    assert sorted(r.replica_id for r in routes.routed) == ["smollm2-r1", "smollm2-r2"]


def test_the_router_keeps_requests_off_replicas_without_a_free_slot():
    shared = "You are a helpful assistant. " * 40

    def placed(slots):
        routes = LoopbackRoutes("m", ["http://127.0.0.1:1", "http://127.0.0.1:2"])
        views = [RequestView("m", text=f"{shared}{i}") for i in range(5)]
        return [routes.route(view, slots=slots).replica_id for view in views]

    assert len(set(placed(None))) == 1  # by prefix alone: all on one replica
    assert sorted(placed(2)[:4]) == ["m-r1", "m-r1", "m-r2", "m-r2"]  # then both are full
    assert placed(2)[4] in {"m-r1", "m-r2"}


def test_the_router_counts_free_slots_by_its_own_requests_not_stale_reports():
    """Replicas report their in-flight answers every stats period; a report from when one was
    full must not send the next request to queue in the other's engine."""
    shared = "You are a helpful assistant. " * 40
    routes = LoopbackRoutes("m", ["http://127.0.0.1:1", "http://127.0.0.1:2"])
    for replica in routes.replicas:
        replica.routing_stats = {"in_flight": 2}  # both full, a report ago; none of ours since
    placed = [routes.route(RequestView("m", text=f"{shared}{i}"), slots=2) for i in range(4)]
    assert sorted(r.replica_id for r in placed) == ["m-r1", "m-r1", "m-r2", "m-r2"]
    for routed in placed:
        if routed.replica_id == "m-r1":
            routes.finish(routed)
    again = routes.route(RequestView("m", text=f"{shared}5"), slots=1.5)  # 3 slots, 2 ingresses
    assert again.replica_id == "m-r1"  # m-r2 holds 2 of ours: over this ingress's share


async def test_without_preemption_the_waiter_waits_for_the_stream(cpu_model):
    double = {"model": True, "tokens": 8, "token_delay": 0.02}
    config = _config(cpu_model, admission={"preempt": False})
    async with make_client(cpu_model, config=config, double=double) as (c, e, _):
        gate = c._transport.app.gateway.gates["smollm2"]
        batch = asyncio.ensure_future(post(c, "sk-eval", STREAM))
        await eventually(lambda: gate.in_flight == 1)
        assert (await post(c, "sk-chat", BODY)).status_code == 200
        assert (await batch).status_code == 200
    assert [body.get("stream", False) for _, body in e["smollm2"].calls] == [True, False]
    assert gate.preempted == 0


async def test_without_tenants_nothing_changes(cpu_model):
    async with make_client(cpu_model) as (client, engines, _):
        gateway = client._transport.app.gateway
        assert gateway.gates == {} and gateway.gate_of("completions", None) is None
        assert (await client.post("/v1/completions", json=BODY)).status_code == 200
        assert "priority" not in engines["smollm2"].calls[-1][1]
        claimed = await client.post("/v1/completions", json={**BODY, "priority": 3})
        assert claimed.status_code == 200
        assert engines["smollm2"].calls[-1][1]["priority"] == 3  # passed on as before
        text = (await client.get("/metrics")).text
    assert "vrstack_tenant_queue" not in text


def test_engines_are_started_with_priority_scheduling_when_tenants_are_configured(cpu_model):
    with_tenants = load_config(_config(cpu_model))
    for spec in with_tenants.models:
        kwargs = llm_config(spec, source="unused/for-config").engine_kwargs
        assert kwargs["scheduling_policy"] == "priority"
    assert with_tenants.models[0].engine_args == {
        "max_num_seqs": 1,
        "scheduling_policy": "priority",
    }
    again = load_config(with_tenants.model_dump())  # as the ingress replicas load it
    assert again.models == with_tenants.models
    kept = load_config(_config(cpu_model, engine_args={"scheduling_policy": "fcfs"}))
    assert llm_config(kept.models[0], source="x/y").engine_kwargs["scheduling_policy"] == "fcfs"
    alone = load_config({"models": [cpu_model]})
    assert "scheduling_policy" not in llm_config(alone.models[0], source="x/y").engine_kwargs
    assert alone.admission.max_wait_s == 30 and alone.admission.max_queue_per_tenant == 64
