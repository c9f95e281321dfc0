"""What `EngineServer` sends the ingress for each item `LLMServer` yields."""

from __future__ import annotations

from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

from app.engines.llm_server import _plain_items


def test_a_batch_of_sse_strings_is_one_item():
    batch = ['data: {"a": 1}\n\n', 'data: {"a": 2}\n\n', "data: [DONE]\n\n"]
    assert _plain_items(batch) == [{"sse": "".join(batch)}]
    assert _plain_items('data: {"a": 1}\n\n') == [{"sse": 'data: {"a": 1}\n\n'}]


def test_an_engine_error_becomes_an_openai_error_item():
    error = ErrorResponse(error=ErrorInfo(message="too long", type="BadRequestError", code=400))
    (item,) = _plain_items([error])
    assert item["status"] == 400
    assert item["error"]["message"] == "too long"
    assert set(item["error"]) == {"message", "type", "param", "code"}
