"""Tool calling through the ingress, in front of engine doubles on loopback ports: `tools`,
`tool_choice`, assistant `tool_calls` and `role: tool` messages pass to the engine as sent,
OpenAI's rules on them are 400s naming the parameter, tool-call streams pass intact, and prompt
tokens are counted with the tools the chat template renders."""

from __future__ import annotations

import json

import pytest

from app.ingress.prompt_tokens import PromptCounter
from app.ingress.protocol import ChatCompletionRequest, approx_tokens
from tests.engine_double import events
from tests.test_ingress import assert_openai_error, make_client

pytestmark = pytest.mark.anyio
tokenizers = pytest.importorskip("tokenizers")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL = {"id": "call-1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
FOLLOW_UP = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call-1", "content": '{"temperature_c": 21}'},
]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": ASK, "tools": [WEATHER], "tool_choice": NAMED},
        {"messages": ASK, "tools": [WEATHER], "tool_choice": "required"},
        {"messages": ASK, "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False},
        {"messages": ASK, "tools": [{**WEATHER, "function": {"name": "f", "strict": True}}]},
        {"messages": FOLLOW_UP, "tools": [WEATHER], "tool_choice": "none"},
        {"messages": FOLLOW_UP},
    ],
)
async def test_tool_fields_reach_the_engine_as_sent(cpu_model, fields):
    async with make_client(cpu_model) as (client, engines, _):
        response = await client.post(
            "/v1/chat/completions", json={"model": "default", "max_tokens": 8, **fields}
        )
        assert response.status_code == 200, response.text
        endpoint, body = engines["smollm2"].calls[-1]
        assert endpoint == "chat"
        assert body == {"model": "smollm2", "max_tokens": 8, **fields}


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": ASK, "tool_choice": "required"}, "tool_choice", "give 'tools'"),
        ({"messages": ASK, "tool_choice": NAMED}, "tool_choice", "give 'tools'"),
        (
            {
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "other"}},
            },
            "tool_choice",
            "'other' is not in tools: get_weather",
        ),
        ({"messages": ASK, "tools": [WEATHER], "tool_choice": "always"}, "tool_choice", ""),
        ({"messages": ASK, "tools": []}, "tools", "at least 1"),
        ({"messages": ASK, "tools": [{"type": "function"}]}, "tools.0.function", "missing"),
        (
            {"messages": ASK, "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
            "tools.0.type",
            "",
        ),
        (
            {"messages": ASK, "tools": [{"function": {"name": "a b"}}]},
            "tools.0.function.name",
            "pattern",
        ),
        (
            {"messages": ASK, "tools": [WEATHER], "parallel_tool_calls": "maybe"},
            "parallel_tool_calls",
            "",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages.1", "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
            "messages.0",
            "only assistant",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, None, "missing"),
    ],
)
async def test_bad_tool_fields_are_400_naming_the_parameter(cpu_model, fields, param, words):
    async with make_client(cpu_model) as (client, engines, _):
        response = await client.post("/v1/chat/completions", json={"model": "smollm2", **fields})
        error = assert_openai_error(response, 400, param)
        assert words in error["message"] and error["param"]
        assert not engines["smollm2"].calls


async def test_a_tool_call_stream_passes_intact(cpu_model):
    deltas = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call-1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]  # fmt: skip
    async with make_client(cpu_model) as (client, engines, _):
        engines["smollm2"].tokens, engines["smollm2"].events = 0, deltas
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": NAMED,
                  "stream": True},
        )  # fmt: skip
        assert response.status_code == 200
        assert events(response.text) == [*deltas, "[DONE]"]


# -- prompt tokens -------------------------------------------------------------------------------

TOOLS_TEMPLATE = (
    "{% if tools %}{% for t in tools %}<tool>{{ t | tojson }}</tool>{% endfor %}{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}{{ c.function.arguments }}"
    "</call>{% endfor %}{% endfor %}"
)


@pytest.fixture(scope="module")
def words() -> tokenizers.Tokenizer:
    """A word-level tokenizer: one token per whitespace- or punctuation-separated piece."""
    from tokenizers import models, pre_tokenizers

    tokenizer = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_tools_and_tool_messages_are_counted_with_the_template(words):
    counter = PromptCounter(words, TOOLS_TEMPLATE)
    plain = ChatCompletionRequest(model="m", messages=FOLLOW_UP)
    with_tools = ChatCompletionRequest(model="m", messages=FOLLOW_UP, tools=[WEATHER])
    rendered = words.encode(
        "".join(f"<tool>{t}</tool>" for t in [_json(WEATHER)])
        + '<user>Weather in Paris?<assistant><call>get_weather{"city": "Paris"}</call>'
        + '<tool>{"temperature_c": 21}',
        add_special_tokens=False,
    )
    assert counter.count(with_tools) == len(rendered.ids)
    assert counter.count(with_tools) > counter.count(plain) > 0


def test_a_template_failing_on_tools_falls_back_to_the_estimate(words):
    failing = PromptCounter(words, "{% if tools %}{{ raise_exception('no tools') }}{% endif %}")
    request = ChatCompletionRequest(model="m", messages=FOLLOW_UP, tools=[WEATHER], max_tokens=4)
    request.counted(failing.count(request))
    contents = [m.content for m in request.messages]
    calls = [m.tool_calls for m in request.messages if m.tool_calls]
    assert request.estimated_tokens() == approx_tokens([contents, calls, [WEATHER]]) + 4
    assert request.estimated_tokens() > approx_tokens(contents) + 4  # tools are part of it


def _json(tool: dict) -> str:
    import json

    return json.dumps(tool, ensure_ascii=False)


# -- the engine replica ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:coroutine 'EngineServer.__del__' was never awaited")
async def test_a_stream_the_engine_refuses_before_it_starts_is_its_400():
    """vLLM refuses a chat stream (here: a tool choice its server options do not allow) before
    streaming; Ray Serve LLM hands its error over as a stream's first batch."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    from app.engines.llm_server import EngineServer
    from app.engines.request_meter import RequestMeter

    refusal = 'tool_choice=function "get_weather" requires --tool-call-parser to be set'

    async def chat(request):  # stands in for `LLMServer.chat` (Ray's code)
        async def batches():
            yield [ErrorResponse(error=ErrorInfo(message=refusal, type="BadRequest", code=400))]

        return batches()

    server = EngineServer.__new__(EngineServer)
    server._meter, server.chat = RequestMeter(), chat
    body = {"model": "m", "messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "stream": True}
    answer = await server.answer("chat", body)
    assert (answer.status, answer.stream) == (400, None)
    assert json.loads(answer.body)["error"]["message"] == refusal
