"""The ingress edge, hardened (issue 18): auth that cannot be silently off, deeply nested JSON,
request ids, Ray Serve's per-request client hints, engine error text, handle-call limits.

In-process, in front of engine doubles on loopback ports; Ray's own HTTP middlewares and header
parsing are used where the test is about what Ray does with a request before our app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError, field_validator

from app.config import AuthSettings, ConfigError, load_config
from app.engines.http_server import Answer
from app.errors import OpenAIError, validation_message
from app.ingress.asgi import StackApp, create_app
from app.ingress.auth import KeyStore
from app.ingress.deployment import handle_call, handle_stream
from app.ingress.gateway import Gateway
from app.ingress.middleware import MAX_JSON_DEPTH, RAY_EDGE_ENV
from app.ingress.protocol import ChatCompletionRequest, OpenAIRequest
from tests.engine_double import TOKEN, EngineDouble, LoopbackRoutes, Stack
from tests.test_ingress import assert_openai_error, eventually, make_client

pytestmark = pytest.mark.anyio
COMPLETION = {"model": "smollm2", "prompt": "hi", "max_tokens": 4}
FRESH_ID = re.compile(r"^[0-9a-f]{32}$")
# What vLLM answers when its engine died: a 500 with the exception's text.
VLLM_TEXT = "EngineDeadError: EngineCore encountered an issue. See stack trace (above)."


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def ingress_over(
    cpu_model: dict, engine: EngineDouble, **settings: Any
) -> AsyncIterator[StackApp]:
    """The ingress app over `engine` (one model) on a loopback port."""
    config = load_config({"models": [cpu_model], **settings})
    stack = await Stack({cpu_model["name"]: engine}).start()
    gateway = Gateway(config, {}, token=TOKEN, routes=stack.get)
    try:
        yield create_app(gateway)
    finally:
        await gateway.relay.close()
        await stack.stop()


def client_of(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://stack")


# -- 1. auth cannot be silently off ---------------------------------------------------------------
def test_required_keys_missing_everywhere_refuse_to_start_naming_each_place(tmp_path, monkeypatch):
    monkeypatch.delenv("VRSTACK_TEST_KEYS", raising=False)
    empty = tmp_path / "keys"
    empty.write_text("\n")
    settings = AuthSettings(
        required=True,
        api_keys_env="VRSTACK_TEST_KEYS",
        api_keys_file=str(empty),
        api_keys_secret={"name": "stack-keys", "key": "api"},
    )
    with pytest.raises(ConfigError) as refused:
        KeyStore.from_settings(settings)
    for place in ("auth.api_keys", "$VRSTACK_TEST_KEYS", str(empty), "'stack-keys'", "'api'"):
        assert place in str(refused.value), place


def test_the_ingress_refuses_to_start_when_required_keys_are_missing(cpu_model, monkeypatch):
    monkeypatch.delenv("VRSTACK_API_KEYS", raising=False)
    config = load_config({"models": [cpu_model], "auth": {"required": True}})
    with pytest.raises(ConfigError, match=r"\$VRSTACK_API_KEYS"):
        create_app(Gateway(config, {}))
    monkeypatch.setenv("VRSTACK_API_KEYS", "sk-1")
    assert create_app(Gateway(config, {})).keys.enabled


def test_required_keys_need_a_source(cpu_model):
    with pytest.raises(ConfigError, match=r"auth\.required"):
        load_config({"models": [cpu_model], "auth": {"required": True, "api_keys_env": None}})


def test_an_unreadable_key_file_is_named(tmp_path):
    missing = tmp_path / "not-mounted"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        KeyStore.from_settings(AuthSettings(api_keys_file=str(missing)))


def test_auth_off_is_one_warning_saying_where_it_looked(monkeypatch, caplog):
    monkeypatch.delenv("VRSTACK_API_KEYS", raising=False)
    with caplog.at_level(logging.WARNING, logger="vrstack.ingress"):
        assert not KeyStore.from_settings(AuthSettings()).enabled
    (record,) = [r for r in caplog.records if r.name == "vrstack.ingress"]
    assert record.levelno == logging.WARNING
    assert "off" in record.message and "$VRSTACK_API_KEYS" in record.message
    assert "auth.api_keys" in record.message and "auth.required" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vrstack.ingress"):
        assert KeyStore.from_settings(AuthSettings(api_keys=["sk-1"])).enabled
    assert not caplog.records, "no warning when auth is on"


# -- 2. deeply nested JSON ------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [450, 700, 5000])
async def test_deeply_nested_json_is_a_400_without_internals(cpu_model, depth, caplog):
    nested = "[" * depth + '"x"' + "]" * depth
    content = '[{"type": "text", "text": "hi", "extra": ' + nested + "}]"
    raw = '{"model": "smollm2", "messages": [{"role": "user", "content": ' + content + "}]}"
    async with make_client(cpu_model) as (client, engines, _):
        with caplog.at_level(logging.INFO):
            response = await client.post(
                "/v1/chat/completions", content=raw, headers={"x-request-id": "deep-1"}
            )
        error = assert_openai_error(response, 400)
        assert "pydantic.dev" not in response.text and str(MAX_JSON_DEPTH) in error["message"]
        assert response.headers.get_list("x-request-id") == ["deep-1"]
        assert not engines["smollm2"].calls
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_nesting_up_to_the_limit_is_accepted(cpu_model):
    async with make_client(cpu_model) as (client, _, _):
        for extra, status in ((0, 200), (1, 400)):
            depth = MAX_JSON_DEPTH - 5 + extra  # body, messages, message, content, part: 5
            nested = "[" * depth + "1" + "]" * depth
            content = '[{"x": ' + nested + "}]"
            raw = '{"model": "smollm2", "messages": [{"role": "user", "content": ' + content + "}]}"
            response = await client.post("/v1/chat/completions", content=raw)
            assert response.status_code == status, response.text


def test_the_token_estimate_does_not_recurse():
    """Handle calls skip the JSON depth check: the estimate must not hit Python's limit."""
    nested: Any = "x"
    for _ in range(5000):
        nested = [nested]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"deep": nested}]}]}
    )
    assert request.estimated_tokens() == 1 + 16


class _Checked(OpenAIRequest):
    """A request model whose validator quotes another pydantic error, as libraries do."""

    size: str

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            TypeAdapter(int).validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"size is not a number: {exc}") from None
        return value


def test_validation_messages_carry_no_pydantic_internals():
    with pytest.raises(ValidationError) as failed:
        _Checked.model_validate({"model": "m", "size": "big"})
    assert "errors.pydantic.dev" in str(failed.value)  # what pydantic itself says
    message, param = validation_message(failed.value)
    assert param == "size" and message.startswith("invalid parameter 'size': size is not")
    assert "pydantic.dev" not in message and "\n" not in message and "type=" not in message


# -- 3. request ids -------------------------------------------------------------------------------
EDGE_CASES = {
    "valid": (b"client-1.a:b_c", "client-1.a:b_c"),
    "not utf-8": (b"abc\xff\xfe", None),
    "too long": (b"a" * 129, None),
    "malformed": (b"has spaces/and=signs", None),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
async def test_every_answer_carries_one_request_id(cpu_model, case):
    given, echoed = EDGE_CASES[case]
    config = {
        "models": [cpu_model],
        "auth": {"api_keys": ["sk-1"]},
        "limits": {"max_body_bytes": 4096, "per_key": {"requests_per_second": 0.01, "burst": 1}},
    }
    anonymous = {"x-request-id": given}
    key = {"authorization": "Bearer sk-1", **anonymous}
    async with make_client(cpu_model, config=config) as (client, _, _):
        answers = {
            200: await client.post("/v1/completions", json=COMPLETION, headers=key),
            429: await client.post("/v1/completions", json=COMPLETION, headers=key),
            401: await client.post("/v1/completions", json=COMPLETION, headers=anonymous),
            400: await client.post("/v1/completions", content=b"{", headers=key),
            413: await client.post("/v1/completions", content=b"x" * 5000, headers=key),
            404: await client.get("/v2/nothing", headers=key),
            405: await client.delete("/v1/models", headers=key),
            -405: await client.get("/v1/completions", headers=key),
            -200: await client.head("/health", headers=anonymous),
        }  # fmt: skip
    for status, response in answers.items():
        assert response.status_code == abs(status), (status, response.text)
        (request_id,) = response.headers.get_list("x-request-id")
        if echoed is None:
            assert FRESH_ID.match(request_id), (status, request_id)
        else:
            assert request_id == echoed, status


def behind_ray(app: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[tuple]]:
    """`app` as Ray Serve's HTTP server runs an ingress with `RAY_EDGE_ENV` in its environment:
    Ray's middlewares (its own `RequestIdMiddleware` and what the variable names), then what its
    direct-ingress entry reads from the headers before calling the app (recorded)."""
    from ray.serve._private import http_util
    from ray.serve.config import HTTPOptions

    seen: list[tuple] = []

    async def direct_ingress(scope: Any, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])  # as ray.serve._private.replica reads them
        seen.append((
            headers[b"x-request-id"].decode("utf-8"),
            http_util.parse_request_timeout_header(headers, None),
            http_util.parse_disconnect_disabled_header(headers),
        ))  # fmt: skip
        await app(scope, receive, send)

    (name, path), *_ = RAY_EDGE_ENV.items()
    monkeypatch.setattr(http_util, name, path)  # Ray reads the variable once, at import
    options = http_util.configure_http_middlewares(HTTPOptions())
    return http_util._apply_middlewares(direct_ingress, options.middlewares), seen


async def test_behind_ray_the_edge_fixes_the_id_and_drops_client_hints(cpu_model, monkeypatch):
    async with ingress_over(cpu_model, EngineDouble("smollm2")) as app:
        wrapped, seen = behind_ray(app, monkeypatch)
        hints = {"x-request-timeout-seconds": "0.001", "x-request-disconnect-disabled": "?1"}
        async with client_of(wrapped) as client:
            bad = await client.post(
                "/v1/completions", json=COMPLETION, headers={"x-request-id": b"a\xff", **hints}
            )
            good = await client.post(
                "/v1/completions", json=COMPLETION, headers={"x-request-id": "c-1", **hints}
            )
            missing = await client.get("/v2/nothing")
    assert bad.status_code == good.status_code == 200 and missing.status_code == 404
    (fresh,) = bad.headers.get_list("x-request-id")
    assert FRESH_ID.match(fresh) and good.headers.get_list("x-request-id") == ["c-1"]
    (generated,) = missing.headers.get_list("x-request-id")
    # Ray saw a valid id, no time-out (None: its default) and, whatever the client said, that it
    # need not watch for the client leaving (the app does: the next test).
    assert seen == [(fresh, None, True), ("c-1", None, True), (generated, None, True)]


# -- 4. a client that leaves ----------------------------------------------------------------------
async def test_a_client_leaving_cancels_its_generation_whatever_it_told_ray(cpu_model):
    engine = EngineDouble("smollm2", mode="hang_stream")  # one token, then nothing
    async with ingress_over(cpu_model, engine, server={"request_timeout_s": 60}) as app:
        left = asyncio.Event()
        body = json.dumps({**COMPLETION, "stream": True}).encode()
        requests = [{"type": "http.request", "body": body}]

        async def receive() -> dict:
            if requests:
                return requests.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:  # a server drops what comes after a disconnect
            if message["type"] == "http.response.body" and message.get("body"):
                left.set()  # the client read the first token and went away

        hint = (b"x-request-disconnect-disabled", b"?1")  # Ray: do not cancel when it leaves
        headers = [(b"content-type", b"application/json"), hint]
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
        await asyncio.wait_for(app(scope, receive, send), 5)
        await eventually(lambda: engine.cancelled == 1)
        assert not any(app.metrics.status()["in_flight"].values())


# -- 5. engine error text -------------------------------------------------------------------------
class _FailingEngine(EngineDouble):
    """Answers as vLLM does when it fails: an OpenAI-shaped error carrying its own text."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__("smollm2")
        self.status, self.text = status, text

    async def answer(self, endpoint: str, body: dict[str, Any]) -> Answer:
        self.calls.append((endpoint, body))
        return Answer.error(self.status, self.text)


async def test_engine_failure_text_stays_in_the_log(cpu_model, caplog):
    engine = _FailingEngine(500, VLLM_TEXT)
    async with ingress_over(cpu_model, engine) as app, client_of(app) as client:
        with caplog.at_level(logging.ERROR):
            response = await client.post(
                "/v1/completions", json=COMPLETION, headers={"x-request-id": "r-500"}
            )
    error = assert_openai_error(response, 500)
    assert "Engine" not in response.text and error["code"] == "engine_error"
    assert response.headers.get_list("x-request-id") == ["r-500"]
    assert [r for r in caplog.records if "r-500" in r.message and VLLM_TEXT in r.message]


async def test_an_engine_400_keeps_its_message_but_not_pydantic_links(cpu_model):
    with pytest.raises(ValidationError) as failed:
        TypeAdapter(int).validate_python("x")
    engine = _FailingEngine(400, str(failed.value))
    async with ingress_over(cpu_model, engine) as app, client_of(app) as client:
        response = await client.post("/v1/completions", json=COMPLETION)
    error = assert_openai_error(response, 400)
    assert "Input should be a valid integer" in error["message"]
    assert "pydantic.dev" not in error["message"]


# -- 6. handle calls ------------------------------------------------------------------------------
class _ServeHandle:
    """Stands in for an engine deployment's Ray Serve handle (`serve_openai`, streaming)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []  # what reached the engine

    def options(self, **_: Any) -> _ServeHandle:
        return self

    def remote(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[dict]:
        self.bodies.append(body)

        async def items() -> AsyncIterator[dict]:
            if body.get("stream"):
                yield {"chunk": {"model": body["model"]}}
            else:
                yield {"body": {"model": body["model"]}}

        return items()


async def test_handle_calls_take_the_per_key_limits(cpu_model):
    config = load_config({
        "models": [cpu_model],
        "limits": {"per_key": {"requests_per_second": 0.01, "burst": 2}},
    })  # fmt: skip
    routes = LoopbackRoutes("smollm2", ["http://127.0.0.1:1"])
    gateway = Gateway(config, {"smollm2": _ServeHandle()}, routes=lambda _: routes)
    assert (await handle_call(gateway, "completions", COMPLETION))["model"] == "smollm2"
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    assert [chunk async for chunk in handle_stream(gateway, "chat", chat)] == [{"model": "smollm2"}]
    with pytest.raises(OpenAIError) as limited:
        await handle_call(gateway, "completions", COMPLETION)
    assert limited.value.status == 429 and limited.value.code == "rate_limit_exceeded"


async def test_handle_calls_with_an_api_key_take_its_tenants_rules(cpu_model):
    config = load_config({
        "models": [cpu_model, {**cpu_model, "name": "other", "aliases": []}],
        "tenants": [{
            "name": "chat", "api_keys": ["sk-chat"], "priority": "interactive",
            "models": ["smollm2"], "max_tokens": 8,
            "quotas": {"requests_per_second": 0.01, "burst": 2},
        }],
        "limits": {"per_key": {"requests_per_second": 0.01, "burst": 1}},
    })  # fmt: skip
    routes = LoopbackRoutes("smollm2", ["http://127.0.0.1:1"])
    engine = _ServeHandle()
    handles = {"smollm2": engine, "other": _ServeHandle()}
    gateway = Gateway(config, handles, routes=lambda _: routes)
    keys = KeyStore.from_settings(config.auth, config.tenants)
    assert (await handle_call(gateway, "completions", COMPLETION, keys, "sk-chat"))["model"]
    assert engine.bodies[-1]["priority"] == 0  # interactive, carried to the engine
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
    chunks = [c async for c in handle_stream(gateway, "chat", chat, keys, "sk-chat")]
    assert chunks == [{"model": "smollm2"}]
    assert engine.bodies[-1]["max_tokens"] == 8  # the tenant's default output bound
    refusals = {}
    for name, body in {
        "model": {**COMPLETION, "model": "other"},  # not the tenant's
        "bound": {**COMPLETION, "max_tokens": 9},  # above its max_tokens
        "quota": COMPLETION,  # its burst of 2 is spent
        "key": COMPLETION,
    }.items():
        with pytest.raises(OpenAIError) as refused:
            await handle_call(
                gateway, "completions", body, keys, "sk-nope" if name == "key" else "sk-chat"
            )
        refusals[name] = (refused.value.status, refused.value.code)
    assert refusals == {
        "model": (404, "model_not_found"),
        "bound": (400, "invalid_value"),
        "quota": (429, "rate_limit_exceeded"),
        "key": (401, "invalid_api_key"),
    }
    assert len(engine.bodies) == 2  # nothing refused reached the engine
    # Without a key: the anonymous callers' own limits, the standard priority.
    assert (await handle_call(gateway, "completions", COMPLETION, keys))["model"] == "smollm2"
    assert engine.bodies[-1]["priority"] == 10
