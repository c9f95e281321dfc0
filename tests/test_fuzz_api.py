"""schemathesis against the ingress's own OpenAPI schema (in-process, in front of engine
doubles on loopback ports): no 5xx for any generated request, and every error is OpenAI-shaped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import load_config
from app.ingress.asgi import create_app
from app.ingress.gateway import Gateway
from tests.engine_double import TOKEN, EngineDouble, Stack, serving

MODEL = {"name": "smollm2", "source": "org/model", "aliases": ["default"]}


STACK = Stack({"smollm2": EngineDouble("smollm2")})
_config = load_config({"models": [MODEL], "limits": {"max_tokens": 4096}})
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Gateway(_config, {}, token=TOKEN, routes=STACK.get))
)
# Valid and invalid requests alike (wrong types, missing fields, out-of-range values).
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module", autouse=True)
def engine_ports() -> Iterator[Stack]:
    with serving(STACK) as stack:
        yield stack


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_5xx_and_openai_shaped_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.path, case.body, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, response.text
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.text
    assert response.headers.get("x-request-id")
