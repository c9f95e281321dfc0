"""The response store alone: bounds (least recently used dropped), expiry, owner isolation,
conversations through `previous_response_id` chains."""

from __future__ import annotations

from app.responses import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def response(response_id: str, text: str, previous: str | None = None) -> dict:
    output = [{"type": "message", "id": f"out-{response_id}", "role": "assistant",
               "content": [{"type": "output_text", "text": text}]}]  # fmt: skip
    return {"id": response_id, "previous_response_id": previous, "output": output}


def said(text: str) -> list[dict]:
    return [{"type": "message", "id": f"in-{text}", "role": "user",
             "content": [{"type": "input_text", "text": text}]}]  # fmt: skip


def texts(items: list[dict] | None) -> list[str]:
    assert items is not None
    return [item["content"][0]["text"] for item in items]


def test_a_chain_is_one_conversation_oldest_first():
    store = ResponseStore(10, 60)
    store.put(response("r1", "hello"), said("hi"), "a")
    store.put(response("r2", "fine", "r1"), said("how are you"), "a")
    store.put(response("r3", "bye", "r2"), said("see you"), "a")
    assert texts(store.conversation("r3", "a")) == [
        "hi", "hello", "how are you", "fine", "see you", "bye"
    ]  # fmt: skip
    assert texts(store.input_items("r3", "a")) == ["hi", "hello", "how are you", "fine", "see you"]
    assert texts(store.input_items("r1", "a")) == ["hi"]
    assert store.get("r2", "a")["output"][0]["content"][0]["text"] == "fine"


def test_another_owner_sees_nothing():
    store = ResponseStore(10, 60)
    store.put(response("r1", "secret"), said("hi"), "tenant:a")
    assert store.get("r1", "tenant:b") is None
    assert store.conversation("r1", "tenant:b") is None
    assert store.input_items("r1", "tenant:b") is None
    assert not store.delete("r1", "tenant:b")
    assert store.get("r1", "tenant:a") is not None
    assert store.delete("r1", "tenant:a")
    assert store.get("r1", "tenant:a") is None and not store.delete("r1", "tenant:a")


def test_least_recently_used_go_first_when_full():
    store = ResponseStore(3, 60)
    for i in range(3):
        store.put(response(f"r{i}", "x"), said(str(i)), "a")
    assert store.get("r0", "a") is not None  # r0 used: r1 is now the least recent
    store.put(response("r3", "x"), said("3"), "a")
    assert store.get("r1", "a") is None
    assert all(store.get(f"r{i}", "a") is not None for i in (0, 2, 3))
    assert store.status()["stored"] == 3 and store.status()["dropped"] == 1


def test_entries_expire_after_ttl_since_last_use():
    clock = Clock()
    store = ResponseStore(10, 60, clock=clock)
    store.put(response("old", "x"), said("a"), "a")
    clock.now = 30
    store.put(response("new", "x"), said("b"), "a")
    clock.now = 59
    assert store.get("old", "a") is not None  # used: 60 s more from now
    clock.now = 100
    assert store.get("new", "a") is None  # last used at 30
    assert store.get("old", "a") is not None  # last used at 59
    clock.now = 200
    assert store.get("old", "a") is None
    assert store.status()["expired"] == 2 and store.status()["stored"] == 0


def test_continuing_a_chain_keeps_its_earlier_turns():
    clock = Clock()
    store = ResponseStore(3, 60, clock=clock)
    store.put(response("r1", "x"), said("1"), "a")
    store.put(response("other", "x"), said("o"), "a")
    clock.now = 50
    store.put(response("r2", "x", "r1"), said("2"), "a")
    assert store.conversation("r2", "a") is not None  # touches r1 too
    clock.now = 100  # r1 was created at 0 but used at 50 through r2's chain
    assert texts(store.conversation("r2", "a")) == ["1", "x", "2", "x"]
    assert store.get("other", "a") is None  # expired: unused since 0
    store.put(response("r3", "x"), said("3"), "a")
    store.put(response("r4", "x"), said("4"), "a")  # full: the least recent goes
    assert store.get("r2", "a") is None, "the later turn goes before the earlier one"
    assert store.get("r1", "a") is not None


def test_a_chain_with_a_deleted_turn_cannot_be_continued():
    store = ResponseStore(10, 60)
    store.put(response("r1", "x"), said("1"), "a")
    store.put(response("r2", "x", "r1"), said("2"), "a")
    assert store.delete("r1", "a")
    assert store.get("r2", "a") is not None
    assert store.conversation("r2", "a") is None and store.input_items("r2", "a") is None
