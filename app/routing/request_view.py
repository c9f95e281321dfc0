"""OpenAI request bodies as routing views: the one reading of a body's prompt.

A body's prompt is, in this order: `prompt` as text; `prompt` as token ids; the first prompt of
a batch (`prompt: [str, ...]`, as text); or chat `messages`, rendered as one `role: content`
line per message. The Ray Serve request router, the lab's traces, the HTTP simulator and the
benchmarks' tiny router all read bodies here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.routing.types import RequestView


def render_messages(messages: Sequence[Any]) -> str:
    """Chat messages as one prompt text: a `role: content` line per message (dicts only)."""
    return "".join(
        f"{m.get('role', 'user')}: {m.get('content', '')}\n"
        for m in messages
        if isinstance(m, dict)
    )


def prompt_of(body: Mapping[str, Any]) -> str | list[int] | None:
    """The body's prompt: text, token ids, or chat messages rendered; None if it has none."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        return prompt if isinstance(prompt[0], int) else str(prompt[0])
    messages = body.get("messages")
    if isinstance(messages, list):
        return render_messages(messages)
    return None


def prompt_text(body: Mapping[str, Any]) -> str:
    """The body's prompt as text: token ids as decimal words, `""` when it has none."""
    prompt = prompt_of(body)
    if prompt is None:
        return ""
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def view_of_body(
    body: Mapping[str, Any],
    *,
    model: str,
    session_key: str | None = None,
    lora_adapter: str | None = None,
    token_ids: Sequence[int] | None = None,
) -> RequestView:
    """The routing view of an OpenAI completions or chat body.

    The model is the body's `model`, else `model`; a LoRA adapter's request (`lora_adapter`,
    which the body names) is `model`'s, its blocks hashed under the adapter. The session key
    is `session_key`, else the body's `user`; the prompt is `token_ids` when given (the
    engine's tokens of it), else token-id prompts keep their ids, and every other prompt is
    text.
    """
    prompt = token_ids if token_ids is not None else prompt_of(body)
    return RequestView(
        model=model if lora_adapter else str(body.get("model", model)),
        text=prompt if isinstance(prompt, str) else None,
        token_ids=prompt if isinstance(prompt, list | tuple) else None,
        session_key=session_key or body.get("user") or None,
        lora_adapter=lora_adapter or None,
    )
