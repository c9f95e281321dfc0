"""Per-call costs of the ingress's hot-path helpers, in-process (no Ray, no engine):

    python -m benchmarks.hot_path_costs

- counting a prompt's tokens with the embedded model's tokenizer at admission
  (`app.ingress.prompt_tokens`): a short completion and a one-message chat;
- reading one event of a migratable stream (`app.ingress.migration.Stream.take`: its token ids
  noted and taken out of the chunk), for a completion and a chat.

Each is timed over `--rounds` calls after a warm-up and printed in microseconds a call.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from app.engines import embedded
from app.ingress.migration import Stream
from app.ingress.prompt_tokens import PromptCounter
from app.ingress.protocol import ChatCompletionRequest, CompletionRequest

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def micros(call: Callable[[], Any], rounds: int) -> float:
    """Microseconds a call of `call`, over `rounds` calls after `rounds // 10` unmeasured."""
    for _ in range(rounds // 10):
        call()
    started = time.perf_counter()
    for _ in range(rounds):
        call()
    return (time.perf_counter() - started) / rounds * 1e6


def counter() -> PromptCounter:
    """The embedded model's counter, as its engine hands its tokenizer over."""
    import tokenizers

    folder = embedded.prepare("smollm2")
    return PromptCounter.from_spec({
        "tokenizer": tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).to_str(),
        "chat_template": (folder / "chat_template.jinja").read_text(),
        "special_tokens": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    })  # fmt: skip


def stream_events(chat: bool) -> tuple[Stream, bytes]:
    """A stream past its first chunk, and a next event as vLLM sends it (compact JSON)."""
    head = {"id": "cmpl-8f2b0c6b1e2a4f0f9d3c", "created": 1796538300, "model": "smollm2"}
    if chat:
        first = {
            **head,
            "object": "chat.completion.chunk",
            "prompt_token_ids": list(range(40)),
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
        choice = {
            "index": 0,
            "delta": {"content": " railway"},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": [28543],
        }
    else:
        first = {
            **head,
            "object": "text_completion",
            "choices": [
                {"index": 0, "text": " The", "prompt_token_ids": list(range(40)), "token_ids": [1]}
            ],
        }
        choice = {
            "index": 0,
            "text": " railway",
            "logprobs": None,
            "finish_reason": None,
            "stop_reason": None,
            "prompt_token_ids": None,
            "token_ids": [28543],
        }
    stream = Stream(chat=chat)  # fmt: skip
    stream.take(b"data: " + json.dumps(first, separators=(",", ":")).encode())
    event = {**first, "choices": [choice]}
    event.pop("prompt_token_ids", None)
    return stream, b"data: " + json.dumps(event, separators=(",", ":")).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20_000)
    a = p.parse_args()
    count = counter()
    requests = {
        "completion": CompletionRequest(model="smollm2", prompt="Once upon a time, in a land "
                                        "far away,", max_tokens=8),
        "chat": ChatCompletionRequest(model="smollm2", messages=FRANCE, max_tokens=8),
    }  # fmt: skip
    for name, request in requests.items():
        cost = micros(lambda r=request: count.count(r), a.rounds)
        print(f"counting the prompt tokens of a short {name}: {cost:.1f} µs")
    for chat in (False, True):
        stream, event = stream_events(chat)
        cost = micros(lambda s=stream, e=event: s.take(e), a.rounds * 5)
        print(f"reading a migratable {'chat' if chat else 'completion'} stream's event: "
              f"{cost:.2f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
