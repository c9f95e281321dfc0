"""Responses to chat and back: input forms, instructions, a stored conversation before the new
input; Response objects and stream events parsed by the `openai` package's own types."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from app.responses.convert import chat_request, finished, from_chat, input_items, new_id
from app.responses.convert import response_object as skeleton_of
from app.responses.events import ResponseEvents
from app.responses.request import ResponsesRequest

EVENTS = TypeAdapter(ResponseStreamEvent)


def asked(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_a_string_input_is_one_user_message_after_instructions():
    request = asked(instructions="Be brief.", max_output_tokens=7, temperature=0, user="u1")
    chat = chat_request(request, [], input_items(request))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert (chat.max_tokens, chat.temperature, chat.user, chat.stream) == (7, 0, "u1", False)


def test_list_input_keeps_roles_and_joins_text_parts():
    request = asked(input=[
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Capital "},
                                     {"type": "input_text", "text": "of Spain?"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Madrid.", "annotations": []}]},
        {"role": "user", "content": "And Italy?"},
    ])  # fmt: skip
    items = input_items(request)
    assert all(item["id"].startswith("msg_") and item["type"] == "message" for item in items)
    assert items[2]["content"] == [{"type": "output_text", "text": "Madrid.", "annotations": []}]
    chat = chat_request(request, [], items)
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "Answer in French."),
        ("user", "Capital of Spain?"),
        ("assistant", "Madrid."),
        ("user", "And Italy?"),
    ]


def test_the_stored_conversation_comes_before_the_new_input():
    first = asked(input="My name is Ada.", instructions="Old rules.")
    choice = {"message": {"content": "Hello Ada."}, "finish_reason": "stop"}
    answer = {"model": "m", "created": 5, "choices": [choice]}
    response = from_chat(first, answer, "m")
    history = [*input_items(first), *response["output"]]
    follow = asked(input="What is my name?", instructions="New rules.", previous_response_id="r")
    chat = chat_request(follow, history, input_items(follow))
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "New rules."),  # a previous response's instructions are not carried over
        ("user", "My name is Ada."),
        ("assistant", "Hello Ada."),
        ("user", "What is my name?"),
    ]


def test_a_chat_answer_is_a_response_the_openai_types_accept():
    request = asked(metadata={"k": "v"}, store=False)
    answer = {"model": "m", "created": 5,
              "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
              "choices": [{"message": {"content": "Hey"}, "finish_reason": "stop"}]}  # fmt: skip
    response = Response.model_validate(from_chat(request, answer, "m"))
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hey" and response.metadata == {"k": "v"}
    assert response.usage.input_tokens == 4 and response.usage.total_tokens == 6
    assert response.store is False and response.incomplete_details is None


def test_an_answer_cut_at_its_length_is_incomplete():
    answer = {"choices": [{"message": {"content": "Lo"}, "finish_reason": "length"}]}
    response = Response.model_validate(from_chat(asked(max_output_tokens=1), answer, "m"))
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input.0.content.0.type",
        ),
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format.type"),
        ({"background": True}, "background"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ],
)
def test_what_is_not_served_is_refused_naming_the_parameter(body, param):
    from app.errors import validation_message

    with pytest.raises(ValidationError) as refused:
        asked(**body)
    assert validation_message(refused.value)[1] == param


def stream_events(finish: str) -> list[dict]:
    request = asked(stream=True)
    response_id, message_id = new_id("resp"), new_id("msg")
    events = ResponseEvents(
        skeleton_of(request, response_id=response_id, created_at=1, model="m",
                    status="in_progress"), message_id)  # fmt: skip
    data = events.start() + events.delta("Hel") + events.delta("lo")
    done = finished(request, response_id=response_id, message_id=message_id, created_at=1,
                    model="m", text=events.text, finish_reason=finish,
                    usage={"prompt_tokens": 1, "completion_tokens": 2})  # fmt: skip
    data += events.finish(done)
    parsed = []
    for block in data.decode().strip().split("\n\n"):
        kind, payload = block.split("\n")
        assert kind.startswith("event: ") and payload.startswith("data: ")
        event = json.loads(payload.removeprefix("data: "))
        assert event["type"] == kind.removeprefix("event: ")
        parsed.append(event)
    return parsed


def test_stream_events_are_openai_events_in_order():
    events = stream_events("stop")
    typed = [EVENTS.validate_python(event) for event in events]
    assert [e.type for e in typed] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [e.sequence_number for e in typed] == list(range(len(typed)))
    assert typed[6].text == "Hello" and typed[-1].response.output_text == "Hello"
    assert typed[0].response.id == typed[-1].response.id
    assert typed[2].item.id == typed[-1].response.output[0].id


def test_a_stream_cut_at_its_length_ends_incomplete():
    last = EVENTS.validate_python(stream_events("length")[-1])
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
