"""The cluster's stored responses: one bounded store per Serve application, shared by every
ingress replica, for `GET /v1/responses/{id}` and `previous_response_id` (docs/responses.md).

`ResponseStore` is plain Python, shared by the replicas through the actor `responses:<app>`
(`app.shared_actor`, `shared_store`); replicas that used it tell it every `HEARTBEAT_S` that they
still do, and it ends itself once none has for two minutes.

Each entry is one response: the response object, the input items of its own turn, the id of
the response it continued and its owner (a tenant, or a key). Entries are kept in order of
last use (created, read, or continued through a later turn, which touches the whole chain):
the least recently used go first when more than `max_stored` are kept, and an entry unused for
`ttl_s` expires. A chain's earlier turns are always at least as recently used as its later
ones, so they are never dropped first. Another owner's entry is as absent as a missing one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.shared_actor import Local, Shared, shared

logger = logging.getLogger("vrstack.responses")
HEARTBEAT_S = 30.0


@dataclass(slots=True)
class Entry:
    """One stored response."""

    response: dict[str, Any]  # the Response object as answered
    items: list[dict[str, Any]]  # the input items of its own turn
    previous: str | None  # the response it continued
    owner: str
    used: float = 0.0  # the store's clock at its last use


class ResponseStore:
    """At most `max_stored` responses, each kept `ttl_s` after its last use (see the module
    docstring); `clock` is monotonic seconds."""

    def __init__(
        self, max_stored: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_stored = max_stored
        self.ttl_s = ttl_s
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.dropped = 0  # for room
        self.expired = 0
        self._clock = clock

    def put(
        self,
        response: dict[str, Any],
        items: list[dict[str, Any]],
        owner: str,
    ) -> None:
        """Keep `response` (its `id` and `previous_response_id` read from it) with the input
        items of its turn, for `owner`; the least recently used go when over `max_stored`."""
        now = self._now()
        entry = Entry(response, items, response.get("previous_response_id"), owner, now)
        self.entries[response["id"]] = entry
        self.entries.move_to_end(response["id"])
        while len(self.entries) > self.max_stored:
            self.entries.popitem(last=False)
            self.dropped += 1

    def get(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The stored response object, or None (missing, expired or another owner's)."""
        entry = self._entry(response_id, owner, self._now())
        return entry.response if entry is not None else None

    def delete(self, response_id: str, owner: str) -> bool:
        """Forget a response; whether `owner` had it."""
        if self._entry(response_id, owner, self._now()) is None:
            return False
        del self.entries[response_id]
        return True

    def conversation(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation up to and including `response_id`'s output, oldest
        first: each turn's input items then its output; None when it or one of its earlier
        turns is not there (deleted, expired or another owner's). Touches the whole chain."""
        chain = self._chain(response_id, owner)
        if chain is None:
            return None
        return [item for entry in chain for item in (*entry.items, *entry.response["output"])]

    def input_items(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The items a response was generated from, oldest first: the earlier turns' inputs
        and outputs, then its own input; None as for `conversation`."""
        chain = self._chain(response_id, owner)
        if chain is None:
            return None
        earlier = [item for e in chain[:-1] for item in (*e.items, *e.response["output"])]
        return [*earlier, *chain[-1].items]

    def status(self) -> dict[str, Any]:
        """How many responses are kept, dropped for room and expired; the settings."""
        self._expire(self._now())
        return {"stored": len(self.entries), "dropped": self.dropped, "expired": self.expired,
                "max_stored": self.max_stored, "ttl_s": self.ttl_s}  # fmt: skip

    def _chain(self, response_id: str, owner: str) -> list[Entry] | None:
        now = self._now()
        chain: list[Entry] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None:
            entry = self._entry(current, owner, now)
            if entry is None or current in seen:
                return None
            seen.add(current)
            chain.append(entry)
            current = entry.previous
        return chain[::-1]

    def _entry(self, response_id: str, owner: str, now: float) -> Entry | None:
        """The owner's entry, touched (most recently used from now); None otherwise."""
        entry = self.entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        entry.used = now
        self.entries.move_to_end(response_id)
        return entry

    def _now(self) -> float:
        now = self._clock()
        self._expire(now)
        return now

    def _expire(self, now: float) -> None:
        while self.entries:
            oldest = next(iter(self.entries.values()))
            if now - oldest.used <= self.ttl_s:
                return
            self.entries.popitem(last=False)
            self.expired += 1


def store_name(app_name: str) -> str:
    """The response store actor's name for a Serve application (`app.shared_actor`)."""
    return f"responses:{app_name}"


def shared_store(max_stored: int, ttl_s: float) -> Local | Shared:
    """In a Serve replica, the client of its application's store actor (shared by every
    ingress replica, kept alive by each from its first call); elsewhere (tests, a single
    process), a store in this process."""
    return shared("responses", ResponseStore, max_stored, ttl_s, keep_alive_s=HEARTBEAT_S)
