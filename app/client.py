"""Call a running stack from Python through Ray Serve handles (no HTTP).

    from app.client import StackClient

    client = StackClient()                     # connects to the "vrstack" Serve application
    reply = await client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=16)
    print(reply["choices"][0]["message"]["content"])
    async for chunk in client.stream_completions("smollm2", "Once upon", max_tokens=16):
        print(chunk["choices"][0]["text"], end="")

Requests take the same checks as HTTP ones; a bad request raises `StackError` carrying the
OpenAI-shaped error (`status`, `message`, `param`, `code`). `StackClient(api_key=...)` calls as
that key would over HTTP: its tenant's models, output bounds, quotas and priority, or its own
per-key limits (without a key: the limits of anonymous callers). The `*_sync` variants block, for
code without an event loop. Run inside a Ray job or a driver connected with `ray.init()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.errors import OpenAIError

StackError = OpenAIError
Message = dict[str, Any]


class StackClient:
    """Typed access to the ingress deployment's handle methods."""

    def __init__(
        self, app_name: str = "vrstack", *, handle: Any = None, api_key: str | None = None
    ) -> None:
        if handle is None:
            from ray import serve

            handle = serve.get_app_handle(app_name)
        self._handle = handle
        self._key = {"api_key": api_key} if api_key is not None else {}

    async def completions(self, model: str, prompt: str | list[str], **params: Any) -> dict:
        """A text completion, as OpenAI's completion object (a dict)."""
        body = {"model": model, "prompt": prompt, **params}
        return await self._handle.completions.remote(body, **self._key)

    async def chat(self, model: str, messages: list[Message], **params: Any) -> dict:
        """A chat completion, as OpenAI's chat.completion object (a dict)."""
        body = {"model": model, "messages": messages, **params}
        return await self._handle.chat.remote(body, **self._key)

    def stream_completions(
        self, model: str, prompt: str | list[str], **params: Any
    ) -> AsyncIterator[dict]:
        """Completion chunks (OpenAI's `text_completion` chunk dicts) as they are generated."""
        body = {"model": model, "prompt": prompt, **params}
        return self._streaming().completions_stream.remote(body, **self._key)

    def stream_chat(
        self, model: str, messages: list[Message], **params: Any
    ) -> AsyncIterator[dict]:
        """Chat chunks (OpenAI's `chat.completion.chunk` dicts) as they are generated."""
        body = {"model": model, "messages": messages, **params}
        return self._streaming().chat_stream.remote(body, **self._key)

    def completions_sync(self, model: str, prompt: str | list[str], **params: Any) -> dict:
        """Blocking `completions`."""
        body = {"model": model, "prompt": prompt, **params}
        return self._handle.completions.remote(body, **self._key).result()

    def chat_sync(self, model: str, messages: list[Message], **params: Any) -> dict:
        """Blocking `chat`."""
        body = {"model": model, "messages": messages, **params}
        return self._handle.chat.remote(body, **self._key).result()

    def _streaming(self) -> Any:
        return self._handle.options(stream=True)
