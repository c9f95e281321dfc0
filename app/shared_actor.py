"""Objects every ingress replica of an application shares (the capture store, stored
responses, files and batches): one plain-Python object kept by a named, detached Ray actor
(`<kind>:<app>` in the `vrstack` namespace), got or created by the first replica that calls it
(it outlives a redeploy's replicas), ended once no replica has called it for `idle_exit_s`
(`app.idle_actor.end_when_idle`). Outside a Serve replica (tests, one process) the object lives
in the process instead (`Local`). Either way callers await its methods:
`await store.method(*args)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.idle_actor import end_when_idle

NAMESPACE = "vrstack"
IDLE_EXIT_S = 120.0


class Local:
    """An object in this process, its methods awaited as a shared one's are."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


class Host:
    """The actor: makes the object, calls its methods, ends once no replica calls it."""

    def __init__(self, make: Callable[..., Any], args: tuple, idle_exit_s: float, what: str):
        self.target = make(*args)
        self.idle_exit_s = idle_exit_s
        self.what = what
        self.last_call = time.monotonic()
        self._watch: asyncio.Task | None = None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.last_call = time.monotonic()
        if self._watch is None:
            idle = end_when_idle(self._idle_s, self.idle_exit_s, self.what)
            self._watch = asyncio.create_task(idle)
        result = getattr(self.target, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def _idle_s(self) -> float:
        return time.monotonic() - self.last_call

    async def touch(self) -> None:
        """A replica still uses the object (with nothing to ask)."""
        self.last_call = time.monotonic()


class Shared:
    """The client of an application's shared object (see the module docstring); with
    `keep_alive_s`, it tells the actor that often, from its first call, that it still uses it
    (for objects that must outlive quiet spells)."""

    def __init__(
        self,
        name: str,
        make: Callable[..., Any],
        *args: Any,
        idle_exit_s: float = IDLE_EXIT_S,
        keep_alive_s: float | None = None,
    ) -> None:
        self.name = name
        self._make, self._args = make, args
        self.idle_exit_s = idle_exit_s
        self.keep_alive_s = keep_alive_s
        self._actor: Any = None
        self._beat: asyncio.Task | None = None

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            options = {"name": self.name, "namespace": NAMESPACE, "lifetime": "detached",
                       "get_if_exists": True, "num_cpus": 0, "max_restarts": 0}  # fmt: skip
            what = self.name.split(":", 1)[0]
            self._actor = (
                ray.remote(Host)
                .options(**options)
                .remote(self._make, self._args, self.idle_exit_s, what)
            )
        if self.keep_alive_s is not None and self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(self._keep_alive())
        return self._actor

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._handle().call.remote(method, *args, **kwargs)
        except Exception:
            self._actor = None  # gone (idle, or its node lost): get or create it next time
            raise

    async def _keep_alive(self) -> None:
        assert self.keep_alive_s is not None
        while True:
            await asyncio.sleep(min(self.keep_alive_s, self.idle_exit_s / 4))
            with contextlib.suppress(Exception):
                await self._handle().touch.remote()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(name, *args, **kwargs)

        return call


def shared(
    kind: str,
    make: Callable[..., Any],
    *args: Any,
    idle_exit_s: float = IDLE_EXIT_S,
    keep_alive_s: float | None = None,
) -> Local | Shared:
    """In a Serve replica, the client of its application's `kind` object (`make(*args)` in the
    actor `<kind>:<app>`); elsewhere (tests, a single process), `make(*args)` in this process."""
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
    except Exception:  # not in a Serve replica
        return Local(make(*args))
    return Shared(
        f"{kind}:{app_name}", make, *args, idle_exit_s=idle_exit_s, keep_alive_s=keep_alive_s
    )
