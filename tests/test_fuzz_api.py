"""Fuzzing the ingress app in-process, in front of engine doubles on loopback ports, with API keys
on: every path it serves (the OpenAPI schema's operations, the aliases hidden from it such as
`/models`, and HEAD on every GET), bodies from schemathesis (valid and invalid) and odd headers
(`x-request-id`, `authorization`, `content-type`, a lying `content-length`, Ray's client hints).

The contract checked on every answer (`assert_contract`): no 5xx; every error is OpenAI-shaped
`{"error": {"message", "type", "param", "code"}}` with no traceback or pydantic internals; one
`x-request-id`, printable ASCII of at most 128 characters, the client's own when it is plainly
valid."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.python.asgi import get_client
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import load_config
from app.ingress.asgi import StackApp, create_app
from app.ingress.gateway import Gateway
from tests.engine_double import TOKEN, EngineDouble, Stack, serving

MODEL = {"name": "smollm2", "source": "org/model", "aliases": ["default"]}
KEY = "fuzz-key"
BEARER = f"Bearer {KEY}"
FAKE_LENGTH = "x-fuzz-content-length"  # sent as `content-length` (see `lying_length`)
PLAIN_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # an id any sane rule accepts: must be echoed
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def lying_length(app: ASGIApp) -> ASGIApp:
    """`app`, its request's `content-length` replaced by the `x-fuzz-content-length` header when
    one is sent (client libraries always send the true length)."""
    fake = FAKE_LENGTH.encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers") or []
        declared = [v for k, v in headers if k == fake]
        if scope["type"] == "http" and declared:
            kept = [(k, v) for k, v in headers if k not in (fake, b"content-length")]
            scope = {**scope, "headers": [*kept, (b"content-length", declared[0])]}
        await app(scope, receive, send)

    return wrapped


def served(app: StackApp) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of everything the app answers: its POST routes, and GET (with
    HEAD) or whatever else each FastAPI route takes."""
    out = {("POST", path) for path in app.posts}
    for route in app.api.routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # `{model:path}` -> `{model}`
        out |= {(method, path) for method in (route.methods or set()) | {"HEAD"}}
    return out


def fuzz_schema(app: StackApp) -> dict[str, Any]:
    """The app's OpenAPI schema with an operation for each of `served(app)` it lacks (a HEAD
    copies its GET), and `model` one of the served names (else nearly every body is a 404)."""
    raw = copy.deepcopy(app.api.openapi())
    names = [card["id"] for card in app.gateway.model_cards()]
    for component in raw["components"]["schemas"].values():
        if "model" in component.get("properties", {}):
            component["properties"]["model"] = {"type": "string", "enum": names}
    for method, path in sorted(served(app)):
        operations = raw["paths"].setdefault(path, {})
        if method.lower() in operations:
            continue
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", path)
        ]
        get = operations.get("get", {})
        operations[method.lower()] = {
            "parameters": get.get("parameters", params),
            "responses": {"200": {"description": "served"}},
        }
    return raw


# -- odd headers: latin-1 text (bytes 0x80-0xff are not UTF-8 on the wire), long values --------
_LATIN1 = st.characters(codec="latin-1", exclude_characters="\r\n\x00")


def odd(max_size: int = 200) -> st.SearchStrategy[str]:
    return st.text(_LATIN1, max_size=max_size).map(str.lstrip)  # requests refuses leading blanks


LONG = st.builds(str.__mul__, st.sampled_from("a-.é\xff"), st.sampled_from([64, 128, 129, 8192]))
ODD_AUTH = ["", "Bearer", f"bearer {KEY}", f"Bearer {KEY}\xff", f"Basic {KEY}", f"Bearer  {KEY} x"]
ODD_TYPES = ["text/plain", "application/json; charset=latin-1", "*/*", "multipart/form-data; b=x"]
bad_bearer, odd_auth = odd().map("Bearer {}".format), st.sampled_from(ODD_AUTH)
HEADERS = st.fixed_dictionaries(
    {
        "authorization": st.integers(0, 9).flatmap(  # mostly the key: the rest goes deeper
            lambda i: st.just(BEARER) if i < 7 else st.one_of(bad_bearer, odd(), odd_auth)
        )
    },
    optional={
        "x-request-id": st.one_of(odd(), LONG, st.sampled_from(["req-1", "a b", "\xff\xfe", "é"])),
        "content-type": st.one_of(odd(80), st.sampled_from(ODD_TYPES)),
        FAKE_LENGTH: st.one_of(
            st.integers(0, 2**70).map(str), st.sampled_from(["-1", "abc", "1e3", "0x10"]), odd(20)
        ),
        "x-request-timeout-seconds": st.one_of(
            st.floats().map(str), st.sampled_from(["0.001", "0", "-1", "1e309"]), odd(20)
        ),
        "x-request-disconnect-disabled": st.one_of(
            st.sampled_from(["?1", "?0", "1", "true", "?1, ?0"]), odd(20)
        ),
    },
)


def assert_contract(
    method: str,
    status: int,
    headers: Mapping[str, list[str]],
    body: bytes,
    given_id: str | None,
    sent: str = "",
) -> None:
    """No 5xx; an OpenAI-shaped error body with no internals in it (but what the client `sent`
    echoed: a model named "pydantic"); one sane `x-request-id`, the client's if plain."""
    text = body.decode("utf-8", "replace")
    assert status < 500, (status, text[:500])
    ids = headers.get("x-request-id", [])
    assert len(ids) == 1, ids
    (request_id,) = ids
    assert 0 < len(request_id) <= 128, request_id
    assert request_id.isascii() and request_id.isprintable() and " " not in request_id
    if given_id is not None and PLAIN_ID.fullmatch(given_id):
        assert request_id == given_id
    if status >= 400 and method != "HEAD":
        error = json.loads(body)
        assert set(error) == {"error"}, text
        assert set(error["error"]) == {"message", "type", "param", "code"}, text
        assert isinstance(error["error"]["message"], str) and error["error"]["message"], text
        assert isinstance(error["error"]["type"], str), text
        for leak in ("Traceback", "pydantic", 'File "'):
            assert leak not in text or leak in sent, text


STACK = Stack({"smollm2": EngineDouble("smollm2")})
CONFIG = {"models": [MODEL], "limits": {"max_tokens": 4096}, "auth": {"api_keys": [KEY]}}
APP = create_app(Gateway(load_config(CONFIG), {}, token=TOKEN, routes=STACK.get))
schema = schemathesis.openapi.from_dict(fuzz_schema(APP))
schema.app = lying_length(APP)
# Valid and invalid requests alike (wrong types, missing fields, out-of-range values).
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module", autouse=True)
def engine_ports() -> Iterator[Stack]:
    with serving(STACK) as stack:
        yield stack


def test_every_served_path_and_method_is_fuzzed():
    fuzzed = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert fuzzed == served(APP)
    for alias in ("/completions", "/chat/completions", "/embeddings", "/models", "/tokenize"):
        assert ("POST" if alias != "/models" else "GET", alias) in fuzzed


# Examples per operation: 75 in the suite; a longer run by hand, e.g. VRSTACK_FUZZ_EXAMPLES=1000.
EXAMPLES = int(os.environ.get("VRSTACK_FUZZ_EXAMPLES", "75"))


@schema.parametrize()
@schema.given(headers=HEADERS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_5xx_and_openai_shaped_errors(case, headers):
    response = case.call(headers=headers)
    given = headers.get("x-request-id")
    sent = f"{case.path_parameters} {case.query} {case.body}"
    assert_contract(
        case.method, response.status_code, response.headers, response.content, given, sent
    )


UNKNOWN = "/ /v1 /v1/ /completions/ //completions /v2/completions /v1/models/nope /v1/models/a/b"
ODD_PATHS = ["/v1/models/%ff", "/%00", "/v1/completions?x=%ff", *UNKNOWN.split()]
PATHS = sorted({path.replace("{model}", "smollm2") for _, path in served(APP)}) + ODD_PATHS


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_path(method):
    body = json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 2}).encode()
    with get_client(APP) as client:
        for path in PATHS:
            headers = {"authorization": BEARER, "content-type": "application/json"}
            response = client.request(method, path, headers=headers, data=body)
            raw = {k.lower(): response.raw.headers.getlist(k) for k in response.raw.headers}
            assert_contract(method, response.status_code, raw, response.content, None)


def _nested(depth: int, close: bool = True) -> str:
    return "[" * depth + ("]" * depth if close else "")


USER_SURROGATE = {"role": "user", "content": "\udfff"}  # json.dumps escapes it
ODD_BODIES = {
    "empty": b"",
    "not json": b"{",
    "not utf-8": b'{"model": "smollm2", "prompt": "\xff\xfe"}',
    "null": b"null",
    "a list": b"[]",
    "lone surrogate": b'{"model": "smollm2", "prompt": "\\ud800", "input": "\\ud800"}',
    "lone surrogate in chat": json.dumps(
        {"model": "smollm2", "messages": [USER_SURROGATE]}
    ).encode(),
    "surrogate model": b'{"model": "\\ud800x", "prompt": "x"}',
    "NaN": b'{"model": "smollm2", "prompt": "x", "temperature": NaN, "presence_penalty": NaN}',
    "Infinity": b'{"model": "smollm2", "prompt": "x", "top_p": Infinity, "seed": -Infinity}',
    "huge numbers": b'{"model": "smollm2", "prompt": "x", "max_tokens": 1e400, "n": 1'
    + b"0" * 400
    + b"}",
    "duplicate keys": b'{"model": "nope", "model": "smollm2", "prompt": "x", "prompt": 1}',
    "deep list field": f'{{"model": "smollm2", "prompt": "x", "x": {_nested(5000)}}}'.encode(),
    "deep unclosed": f'{{"model": "smollm2", "prompt": {_nested(100_000, close=False)}'.encode(),
    "deep chat content": (
        '{"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "text", "x": '
        f"{_nested(900)}}}]}}]}}"
    ).encode(),
    "deep object": (
        '{"model": "smollm2", "prompt": "x", "x": ' + '{"a": ' * 2000 + "1" + "}" * 2001
    ).encode(),
}


@pytest.mark.parametrize("body", list(ODD_BODIES.values()), ids=list(ODD_BODIES))
def test_odd_bodies_on_every_post_path(body):
    with get_client(lying_length(APP)) as client:
        for path in sorted(APP.posts):
            for stream in (False, True):
                sent = b'{"stream": true, ' + body[1:] if stream and body[:2] == b'{"' else body
                headers = {"authorization": BEARER, "content-type": "application/json"}
                response = client.post(path, headers=headers, data=sent)
                raw = {k.lower(): response.raw.headers.getlist(k) for k in response.raw.headers}
                assert_contract("POST", response.status_code, raw, response.content, None)
