"""The cluster's captured requests: one bounded store per Serve application, fed by every ingress
replica, read by `GET /capture`: plain Python here, shared by the replicas through the actor
`capture:<app>` (`app.shared_actor`), which they call every `flush_s`, records or not, while
capture is on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from app.lab.trace import TraceRequest


class CaptureStore:
    """The newest `max_records` requests of every replica, each with its wall-clock arrival in
    `t` (seconds since the epoch); older ones are dropped (and counted)."""

    def __init__(self, max_records: int) -> None:
        self.records: deque[TraceRequest] = deque(maxlen=max_records)
        self.dropped = 0

    def add(self, batch: Sequence[TraceRequest], dropped: int = 0) -> None:
        """A replica's records (and how many it had to drop itself)."""
        room = self.records.maxlen or 0
        self.dropped += dropped + max(0, len(self.records) + len(batch) - room)
        self.records.extend(batch)

    def read(self, since: float = 0.0) -> list[TraceRequest]:
        """The records that arrived at or after `since` (epoch seconds), oldest first."""
        return sorted((r for r in self.records if r.t >= since), key=lambda r: r.t)

    def status(self) -> dict[str, Any]:
        """How many records are kept and were dropped; the oldest and newest arrival."""
        times = [r.t for r in self.records]
        return {
            "records": len(times),
            "dropped": self.dropped,
            "oldest": min(times, default=None),
            "newest": max(times, default=None),
            "now": time.time(),
        }


def store_name(app_name: str) -> str:
    """The capture store actor's name for a Serve application (`app.shared_actor`)."""
    return f"capture:{app_name}"
