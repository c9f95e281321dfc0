"""A streamed response's server-sent events, in OpenAI's Responses shape: each `event: <type>`
and `data: <json>` with a `sequence_number` counted from 0.

response.created, response.in_progress, response.output_item.added,
response.content_part.added, one response.output_text.delta per engine chunk with text, then
response.output_text.done, response.content_part.done, response.output_item.done and
response.completed (or response.incomplete when cut at `max_output_tokens`) carrying the whole
Response; response.failed when the engine fails midway.
"""

from __future__ import annotations

import json
import time
from typing import Any

from app.responses.convert import new_id, output_message, response_object
from app.responses.request import ResponsesRequest

MEDIA_TYPE = "text/event-stream"


class ResponseEvents:
    """The events of one streamed response, `skeleton` its in-progress Response object."""

    def __init__(self, skeleton: dict[str, Any], message_id: str) -> None:
        self.skeleton = skeleton
        self.message_id = message_id
        self.text = ""
        self.usage: tuple[int, int] | None = None  # (input, output) tokens, once finished
        self._sequence = 0

    @classmethod
    def of(cls, request: ResponsesRequest, model: str) -> ResponseEvents:
        """The events of a new response to `request` by `model`."""
        skeleton = response_object(request, response_id=new_id("resp"),
                                   created_at=int(time.time()), model=model,
                                   status="in_progress")  # fmt: skip
        return cls(skeleton, new_id("msg"))

    def event(self, kind: str, **fields: Any) -> bytes:
        """One event, numbered."""
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def start(self) -> bytes:
        """Everything before the first text: the response, its message and its text part."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        return b"".join((
            self.event("response.created", response=self.skeleton),
            self.event("response.in_progress", response=self.skeleton),
            self.event("response.output_item.added", output_index=0,
                       item={**output_message(self.message_id, "", "in_progress"), "content": []}),
            self.event("response.content_part.added", **where, part=part),
        ))  # fmt: skip

    def delta(self, text: str) -> bytes:
        """A piece of the text."""
        self.text += text
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                          content_index=0, delta=text, logprobs=[])  # fmt: skip

    def finish(self, response: dict[str, Any]) -> bytes:
        """Everything after the last text; `response`: the finished Response."""
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        item = response["output"][0]
        last = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return b"".join((
            self.event("response.output_text.done", **where, text=self.text, logprobs=[]),
            self.event("response.content_part.done", **where, part=item["content"][0]),
            self.event("response.output_item.done", output_index=0, item=item),
            self.event(last, response=response),
        ))  # fmt: skip

    def failed(self, code: str, message: str) -> bytes:
        """The response failed midway (the stream ends with it)."""
        error = {"code": code, "message": message}
        return self.event(
            "response.failed", response={**self.skeleton, "status": "failed", "error": error}
        )
