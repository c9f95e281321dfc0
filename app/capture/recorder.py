"""Live requests recorded as lab trace lines (`app.lab.trace`), in an ingress replica.

`Recorder.begin` takes a sampled request once it is admitted; `end` keeps it if it reached an
engine replica, with its prompt as the router read it (the gateway's `Exchange.view`: the same
block hashes, computed once), or its text with `include_text`, and the answer's output
tokens. Records wait in a bounded buffer (the oldest dropped first) until `run` sends them,
every `flush_s`, to the application's store (`app.capture.store`): one trace for every
ingress replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from app.capture.store import CaptureStore, store_name
from app.config import CaptureSettings, StackConfig
from app.ingress.protocol import OpenAIRequest, SamplingRequest
from app.lab.trace import DEFAULT_MAX_TOKENS, HASH_MASK, TraceRequest, trace_lines
from app.routing import DEFAULT_BLOCK_SIZE
from app.shared_actor import Local, Shared

if TYPE_CHECKING:
    from app.ingress.gateway import Exchange

logger = logging.getLogger("vrstack.capture")
CAPTURED = frozenset({"completions", "chat"})  # the endpoints whose prompts the engines cache
CLOSE_S = 2.0  # how long a stopping replica tries to send its last records


class Store(Protocol):
    """Where records go: a `CaptureStore` in this process or the application's
    (`app.shared_actor`)."""

    async def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None: ...

    async def read(self, since: float = 0.0) -> list[TraceRequest]: ...

    async def status(self) -> dict[str, Any]: ...


class Recorder:
    """One ingress replica's capture: sampling, records, and their trips to the store."""

    def __init__(
        self,
        config: StackConfig,
        store: Store,
        *,
        wall: Callable[[], float] = time.time,
        sample: Callable[[], float] = random.random,
    ) -> None:
        settings = config.capture or CaptureSettings()
        self.settings = settings
        self.config = config
        self.block_size = int(config.router.settings.get("block_size", DEFAULT_BLOCK_SIZE))
        self.store = store
        self.pending: deque[TraceRequest] = deque(maxlen=settings.max_records)
        self.dropped = 0  # dropped here since the last flush
        self._wall = wall
        self._sample = sample
        self._failed = False

    @classmethod
    def of(cls, config: StackConfig) -> Recorder | None:
        """A recorder when the config turns capture on (storing in this process until
        `share`), else None."""
        if config.capture is None or not config.capture.enabled:
            return None
        return cls(config, Local(CaptureStore(config.capture.max_records)))

    def share(self, store: Store) -> None:
        """Send records to `store` from now on."""
        self.store = store

    def share_with(self, app_name: str) -> asyncio.Task:
        """Send records to the application's store actor every `flush_s`: the task doing it."""
        self.share(Shared(store_name(app_name), CaptureStore, self.settings.max_records))
        return asyncio.get_running_loop().create_task(self.run())

    def begin(
        self,
        endpoint: str,
        request: OpenAIRequest,
        tenant: str | None,
        session: str | None,
        started: float,
    ) -> TraceRequest | None:
        """The record of an admitted request if it is sampled (`started`: its
        `time.perf_counter()` on arrival), else None; its prompt comes with `end`."""
        ratio = self.settings.sample_ratio
        if endpoint not in CAPTURED or (ratio < 1 and self._sample() >= ratio):
            return None
        spec = self.config.model(request.model)
        output = request.output_tokens() if isinstance(request, SamplingRequest) else None
        record = TraceRequest(
            t=self._wall() - (time.perf_counter() - started),
            model=spec.name if spec is not None else request.model,
            max_tokens=output or DEFAULT_MAX_TOKENS,
            tenant=tenant,
            endpoint=endpoint,
        )
        if self.settings.include_text:
            fields = request.model_dump(include={"messages"}, exclude_unset=True, by_alias=True)
            record.messages = fields.get("messages")
        return record

    def end(self, record: TraceRequest, exchange: Exchange) -> None:
        """Keep the record if its request reached an engine replica: its prompt as the router
        read it (`Exchange.view`: block hashes already computed for routing are reused), and
        the answer's output tokens."""
        view = exchange.view
        if exchange.decision is None or view is None:
            return
        record.session = view.session_key
        if self.settings.include_text:
            record.prompt, record.tokens = view.text, _ids(view.token_ids)
        else:
            record.blocks = _unsigned(view.block_hashes(self.block_size))
            record.block_size = self.block_size
            record.prompt_tokens = view.prompt_tokens
        if exchange.usage is not None:
            record.output_tokens = exchange.usage[1]
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(record)

    async def flush(self) -> None:
        """Send the buffered records to the store; kept for the next try if it fails."""
        batch, dropped = list(self.pending), self.dropped
        self.pending.clear()
        self.dropped = 0
        try:
            await self.store.add(batch, dropped)
        except Exception as exc:
            kept = [*batch, *self.pending]  # newer records came in meanwhile
            room = self.settings.max_records
            self.pending = deque(kept, maxlen=room)
            self.dropped += dropped + max(0, len(kept) - room)
            if not self._failed:
                logger.warning("capture: the store cannot be reached (%r); records wait", exc)
            self._failed = True
            raise
        self._failed = False

    async def run(self) -> None:
        """Flush every `flush_s` until cancelled (an empty flush tells the store we live)."""
        while True:
            await asyncio.sleep(self.settings.flush_s)
            with contextlib.suppress(Exception):
                await self.flush()

    async def read(self, since: float = 0.0) -> list[TraceRequest]:
        """Every replica's records from `since` (epoch seconds), this replica's latest too."""
        await self.flush()
        return await self.store.read(since)

    async def status(self) -> dict[str, Any]:
        """The store's figures (`CaptureStore.status`) and the settings that shape them."""
        await self.flush()
        settings = self.settings.model_dump(exclude={"enabled"})
        return {**await self.store.status(), **settings, "block_size": self.block_size}

    async def close(self) -> None:
        """Send what is left (best effort, at most `CLOSE_S`)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), CLOSE_S)


def _unsigned(hashes: Sequence[int]) -> Sequence[int]:
    """Block hashes as unsigned 64-bit values, 8 bytes each (text hashes already are)."""
    if isinstance(hashes, array):
        return hashes  # the routing view's own, never changed once computed
    return array("Q", [h & HASH_MASK for h in hashes])


def _ids(token_ids: Sequence[int] | None) -> list[int] | None:
    return list(token_ids) if token_ids is not None else None


def timed_lines(records: Sequence[TraceRequest]) -> tuple[list[str], float | None]:
    """Records (oldest first) as trace lines timed from the first: (lines, its epoch time)."""
    if not records:
        return [], None
    start = records[0].t
    return list(trace_lines(replace(r, t=r.t - start) for r in records)), start
