"""One engine replica's LoRA adapters: loaded when a request first names one, the least
recently used unloaded beyond `max_adapters_per_replica`.

The engine's adapter cache holds as many (vLLM's `max_cpu_loras` is set to the same number),
so the list this replica reports to the router (`held`) is what its engine holds. Unloading
frees an adapter's weights but keeps its name known to vLLM: a request that passed `use` just
before still runs, the engine loading the weights again for it (rare: the order is by last
request).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.config.lora import LoraAdapter, LoraSettings, is_local

logger = logging.getLogger("vrstack.engine")
Load = Callable[[str, str], Awaitable[None]]  # (name, local path or Hugging Face id)
Unload = Callable[[str], Awaitable[None]]
Download = Callable[[str, str], None]  # (object-store folder, local folder)


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded; the message names it and says why."""


def local_source(adapter: LoraAdapter, cache: Path, download: Download) -> str:
    """What the engine loads `adapter` from: a local folder (expanded), a Hugging Face id
    (vLLM downloads it), or an object-store folder's copy under `cache` (downloaded once)."""
    if is_local(adapter.source):
        return str(Path(adapter.source).expanduser())
    if not adapter.object_store:
        return adapter.source
    digest = hashlib.sha256(adapter.source.encode()).hexdigest()[:16]
    folder = cache / f"{adapter.name.replace('/', '--')}-{digest}"
    if not (folder / "adapter_config.json").is_file():
        download(adapter.source, str(folder))
        if not (folder / "adapter_config.json").is_file():
            raise AdapterLoadError(
                f"adapter {adapter.name!r}: {adapter.source} has no adapter_config.json"
            )
    return str(folder)


class AdapterSlots:
    """The adapters one replica holds, in least-recently-used order."""

    def __init__(
        self, settings: LoraSettings, load: Load, unload: Unload, download: Download, cache: Path
    ) -> None:
        self._adapters = {a.name: a for a in settings.adapters}
        self.limit = settings.max_adapters_per_replica
        self._load, self._unload, self._download, self._cache = load, unload, download, cache
        self._held: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._lock = asyncio.Lock()  # one load or unload at a time
        self.loads = 0
        self.unloads = 0

    def __contains__(self, name: object) -> bool:
        """Whether `name` is one of the model's adapters."""
        return name in self._adapters

    @property
    def held(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._held)

    def stats(self) -> dict[str, Any]:
        """For the replica's routing stats: the adapters held (`lora_adapters`, read by the
        router), and the loads and unloads so far."""
        return {"lora_adapters": self.held, "lora_loads": self.loads, "lora_unloads": self.unloads}

    async def use(self, name: str) -> None:
        """Make sure the adapter `name` is loaded (unloading the least recently used ones over
        the limit first) and mark it used; AdapterLoadError when it cannot be loaded."""
        if name not in self._held:
            async with self._lock:
                if name not in self._held:
                    await self._make_room()
                    await self._load_one(self._adapters[name])
                    self._held[name] = None
        self._held.move_to_end(name)

    async def _make_room(self) -> None:
        while len(self._held) >= self.limit:
            oldest = next(iter(self._held))
            del self._held[oldest]  # (from now on its requests wait here to load it again)
            try:
                await self._unload(oldest)
            except Exception:  # the engine's own cache evicts it when it needs the room
                logger.exception("unloading LoRA adapter %r failed", oldest)
                continue
            self.unloads += 1
            logger.info("LoRA adapter %r unloaded (least recently used)", oldest)

    async def _load_one(self, adapter: LoraAdapter) -> None:
        started = time.monotonic()
        try:
            source = await asyncio.to_thread(local_source, adapter, self._cache, self._download)
            await self._load(adapter.name, source)
        except AdapterLoadError:
            raise
        except Exception as exc:
            raise AdapterLoadError(
                f"adapter {adapter.name!r} ({adapter.source}) could not be loaded: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        self.loads += 1
        logger.info("LoRA adapter %r loaded in %.1f s", adapter.name, time.monotonic() - started)
