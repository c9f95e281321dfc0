"""A toy greedy "model" for engine simulators: deterministic next tokens from a sequence, so a
stream continued from a prompt of token ids (a migrated stream) makes what an uninterrupted run
makes. Used by the simulated engine deployment and the tests' engine double; no real model."""

from __future__ import annotations

from typing import Any


def next_token(sequence: list[int]) -> int:
    """The next token of a sequence (prompt and output so far): of its last token and its
    length (constant time: endless simulated streams stay fast)."""
    last = sequence[-1] if sequence else 0
    return (last * 7 + len(sequence)) % 1000 + 1


def word(token: int) -> str:
    """A token's text."""
    return f"w{token} "


def prompt_ids(body: dict[str, Any]) -> list[int]:
    """The toy tokenizer: a token-id prompt as it is, a character a token otherwise (a chat's
    messages rendered `role: content` a line each)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if prompt is None:
        prompt = "".join(f"{m['role']}: {m.get('content')}\n" for m in body.get("messages", []))
    return [ord(c) % 1000 for c in str(prompt)]
