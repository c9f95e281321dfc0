"""An engine replica's KV cache events: where its vLLM publishes them, and how the router finds it.

vLLM publishes its prefix cache's changes (`kv_events_config`) from the engine process: numbered
batches on a ZMQ PUB socket and a replay socket that resends the last `buffer_steps` of them.
Each replica takes two free ports of its node for them (several replicas may share a node),
and tells the router where they are, with the engine's block size, in its replica metadata
(`EngineServer.record_replica_metadata`); the router's `app.engines.kv_feed` subscribes.

The sockets listen on every interface of the node (vLLM binds only wildcard addresses) and
carry prompt token ids: keep the engines' ports inside the cluster network.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "kv_events"
BUFFER_STEPS = 10_000  # batches kept for replay (vLLM's default)


@dataclass(frozen=True, slots=True)
class KvPublisher:
    """One replica's publishing ports, on the node address `host`."""

    host: str
    port: int
    replay_port: int

    @classmethod
    def on(cls, host: str) -> KvPublisher:
        """Two free ports of this node."""
        port, replay_port = _free_ports(2)
        return cls(host, port, replay_port)

    def engine_config(self) -> dict[str, Any]:
        """vLLM's `kv_events_config` engine argument."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
            "buffer_steps": BUFFER_STEPS,
        }

    def metadata(self, block_size: int | None) -> dict[str, Any]:
        """What the router reads (`kv_feed.Source.of`), and the engine's block size."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "endpoint": f"tcp://{host}:{self.port}",
            "replay": f"tcp://{host}:{self.replay_port}",
            "block_size": block_size,
        }


def _free_ports(count: int) -> list[int]:
    """Ports free on every interface now (the engine binds them moments later)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET)
            sock.bind(("", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
