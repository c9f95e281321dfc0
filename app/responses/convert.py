"""Responses API to chat completions and back: a request's input (with `instructions` and the
stored conversation of `previous_response_id`) as chat `messages`, and a chat answer as a
Response object.

As OpenAI does, a previous response's `instructions` are not carried into the next turn: only
its input and output items are.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from app.ingress.protocol import ChatCompletionRequest
from app.responses.request import InputMessage, ResponsesRequest

CHAT_ROLES = {"developer": "system"}  # roles chat templates may not know, as they are read


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `resp_...`, `msg_...`."""
    return f"{prefix}_{secrets.token_hex(24)}"


def input_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's `input` as stored items (each message with an id and its text parts;
    an assistant's as output text)."""
    return [_item(message) for message in request.input]


def _item(message: InputMessage) -> dict[str, Any]:
    texts = [part.text for part in message.content]
    if message.role == "assistant":
        parts = [{"type": "output_text", "text": text, "annotations": []} for text in texts]
    else:
        parts = [{"type": "input_text", "text": text} for text in texts]
    return {"type": "message", "id": message.id or new_id("msg"), "role": message.role,
            "status": "completed", "content": parts}  # fmt: skip


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages for `items` (messages, oldest first), after `instructions` as a system
    message."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        text = "".join(part.get("text", "") for part in item.get("content", []))
        role = CHAT_ROLES.get(item["role"], item["role"])
        messages.append({"role": role, "content": text})
    return messages


def chat_request(
    request: ResponsesRequest, history: list[dict[str, Any]], items: list[dict[str, Any]]
) -> ChatCompletionRequest:
    """The chat completion a Responses request is served by: `history` (the stored
    conversation of `previous_response_id`) then `items` (its input), its sampling fields."""
    fields: dict[str, Any] = {
        "model": request.model,
        "messages": chat_messages(request.instructions, [*history, *items]),
    }
    if request.max_output_tokens is not None:
        fields["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        if (value := getattr(request, name)) is not None:
            fields[name] = value
    if request.stream:
        fields["stream"] = True
        fields["stream_options"] = {"include_usage": True}
    return ChatCompletionRequest.model_validate(fields)


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat answer's `usage` in the Responses shape."""
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    output = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(usage.get("total_tokens") or prompt + output),
    }


def output_message(message_id: str, text: str, status: str) -> dict[str, Any]:
    """The assistant's message as a Response output item."""
    return {"type": "message", "id": message_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip


def response_object(
    request: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str = "completed",
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    incomplete: bool = False,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Response object of `request` (`status`: in_progress, completed, incomplete or
    failed; `incomplete`: the output was cut at `max_output_tokens`)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "model": model,
        "output": output or [],
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": request.store,
        "temperature": request.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": request.tool_choice or "auto",
        "tools": [],
        "top_p": request.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": request.user,
    }


def finished(
    request: ResponsesRequest,
    *,
    response_id: str,
    message_id: str,
    created_at: int,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Response of a chat answer's `text`: `incomplete` when it stopped at its length
    bound (`finish_reason: length`), else `completed`."""
    incomplete = finish_reason == "length"
    status = "incomplete" if incomplete else "completed"
    response = response_object(
        request,
        response_id=response_id,
        created_at=created_at,
        model=model,
        status=status,
        output=[output_message(message_id, text, status)],
        usage=response_usage(usage),
        incomplete=incomplete,
    )
    response["completed_at"] = None if incomplete else int(time.time())
    return response


def from_chat(request: ResponsesRequest, answer: dict[str, Any], model: str) -> dict[str, Any]:
    """The Response of a non-streaming chat answer."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    return finished(
        request,
        response_id=new_id("resp"),
        message_id=new_id("msg"),
        created_at=int(answer.get("created") or time.time()),
        model=answer.get("model") or model,
        text=message.get("content") or "",
        finish_reason=choice.get("finish_reason"),
        usage=answer.get("usage"),
    )
