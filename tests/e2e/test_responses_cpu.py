"""/v1/responses on a real vLLM CPU engine behind 2 ingress replicas, with the `openai` client:
a stored response continued through `previous_response_id` by requests that land on both
replicas (the application's response store actor holds the conversation, not a replica), read
back, streamed, deleted; unknown and deleted ids answered as OpenAI does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import openai
import pytest
import ray
import yaml

from app.responses.store import store_name
from app.tenants.ledger import NAMESPACE
from tests.conftest import SERVE_CONFIGS, Cluster
from tests.e2e.conftest import Stack, undeploy, wait_healthy

pytestmark = pytest.mark.e2e
APP = "vrstack-responses"
FOLLOW_UPS = 6  # at once, from the same response: spread over both ingress replicas


@pytest.fixture(scope="module")
def stack(cluster: Cluster) -> Iterator[Stack]:
    from ray import serve

    from app.builder import build_app

    (app,) = yaml.safe_load((SERVE_CONFIGS / "smollm2-cpu.yaml").read_text())["applications"]
    args = app["args"]
    args["server"] = {"ingress_replicas": 2}
    args["auth"] = {"api_keys_env": None}
    serve.run(build_app(args), name=APP, route_prefix="/")
    wait_healthy(cluster.base_url)
    stack = Stack(cluster, APP)
    yield stack
    undeploy(stack)
    with_store = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"] == store_name(APP)]  # fmt: skip
    if with_store:  # detached: it would end once idle; not left for the next tests
        ray.kill(ray.get_actor(store_name(APP), namespace=NAMESPACE))


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", timeout=300)


def _ingress_requests() -> dict[str, int]:
    """Requests HAProxy (Ray Serve's high-throughput proxy, on in every stack) sent to each of
    the application's ingress replicas, from its stats socket on this node."""
    path = f"/tmp/haproxy-serve/{ray.get_runtime_context().get_node_id()}/admin.sock"
    with socket.socket(socket.AF_UNIX) as stats:
        stats.connect(path)
        stats.sendall(b"show stat\n")
        data = b"".join(iter(lambda: stats.recv(65536), b""))
    header, *rows = data.decode().splitlines()
    rows = [dict(zip(header.removeprefix("# ").split(","), row.split(","), strict=False))
            for row in rows if row]  # fmt: skip
    return {row["svname"]: int(row.get("req_tot") or row["stot"])
            for row in rows if f"{APP}-ingress" in row["svname"]}  # fmt: skip


def test_a_conversation_continues_on_both_ingress_replicas(stack):
    api = client(stack)
    first = api.responses.create(
        model="smollm2", input="My name is Ada. Remember it.", instructions="Answer briefly.",
        max_output_tokens=16, temperature=0,
    )  # fmt: skip
    assert first.status in {"completed", "incomplete"} and first.output_text
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    before = _ingress_requests()

    async def follow_ups() -> list:
        # Closed here, in its own loop: an async client left to the garbage collector closes
        # itself on whatever loop runs then (a later test's), over this closed loop's sockets.
        base = f"{stack.base_url}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", timeout=300) as aapi:
            return await asyncio.gather(*(
                aapi.responses.create(model="smollm2", input=f"What is my name? ({i})",
                                      previous_response_id=first.id, max_output_tokens=8,
                                      temperature=0)
                for i in range(FOLLOW_UPS)
            ))  # fmt: skip

    answers = asyncio.run(follow_ups())
    for i, answer in enumerate(answers):
        assert answer.previous_response_id == first.id and answer.output_text
        # The engine was sent the first turn: its prompt is longer than the first one's.
        assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        items = api.responses.input_items.list(answer.id, order="asc")
        texts = [item.content[0].text for item in items.data]
        assert texts == ["My name is Ada. Remember it.", first.output_text,
                         f"What is my name? ({i})"]  # fmt: skip
    after = _ingress_requests()
    spread = {name: n - before.get(name, 0) for name, n in after.items()}
    assert len(spread) == 2 and all(spread.values()), spread  # both replicas answered some

    chained = first
    for turn in range(3):  # one after another: a chain, whichever replica takes each
        chained = api.responses.create(
            model="smollm2", input=f"Turn {turn}.", previous_response_id=chained.id,
            max_output_tokens=4,
        )  # fmt: skip
    items = api.responses.input_items.list(chained.id, order="asc", limit=100)
    assert len(items.data) == 2 + 2 * 3 - 1 and items.data[0].content[0].text.startswith("My")

    for _ in range(4):  # each read by whichever replica
        assert api.responses.retrieve(first.id).output_text == first.output_text
    status = ray.get(ray.get_actor(store_name(APP), namespace=NAMESPACE).call.remote("status"))
    assert status["stored"] == 1 + FOLLOW_UPS + 3, status


def test_a_streamed_follow_up_is_stored_then_deleted(stack):
    api = client(stack)
    first = api.responses.create(model="smollm2", input="Say hi.", max_output_tokens=8)
    with api.responses.stream(
        model="smollm2", input="Again.", previous_response_id=first.id, max_output_tokens=8
    ) as stream:
        seen = list(stream)
        end = seen[-1]
        assert end.type in {"response.completed", "response.incomplete"}
        if end.type == "response.completed":  # not cut at max_output_tokens
            assert stream.get_final_response().id == end.response.id
    deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert deltas and deltas == end.response.output_text
    assert api.responses.retrieve(end.response.id).output_text == deltas

    streamed = api.responses.create(model="smollm2", input="Once more.", stream=True,
                                    previous_response_id=first.id, max_output_tokens=8)  # fmt: skip
    events = list(streamed)
    assert events[0].type == "response.created"
    assert events[-1].type in {"response.completed", "response.incomplete"}
    done = events[-1].response
    assert done.usage.input_tokens > first.usage.input_tokens
    assert api.responses.retrieve(done.id).output_text == done.output_text

    api.responses.delete(first.id)
    for _ in range(3):  # whichever replica answers
        with pytest.raises(openai.NotFoundError):
            api.responses.retrieve(first.id)
        with pytest.raises(openai.BadRequestError) as refused:
            api.responses.create(model="smollm2", input="x", previous_response_id=first.id)
        assert refused.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        api.responses.delete("resp_unknown")
