"""What `EngineServer` answers for each response object or error `LLMServer` yields."""

from __future__ import annotations

from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

from app.engines.llm_server import _plain


def test_an_engine_error_keeps_its_status_in_openai_shape():
    error = ErrorResponse(error=ErrorInfo(message="too long", type="BadRequestError", code=400))
    status, body = _plain(error)
    assert status == 400
    assert body == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_an_error_without_an_http_code_is_a_500():
    error = ErrorResponse(error=ErrorInfo(message="boom", type="InternalError", code=7))
    status, body = _plain(error)
    assert status == 500 and body["error"]["type"] == "server_error"
