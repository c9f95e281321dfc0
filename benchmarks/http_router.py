"""A tiny HTTP router running an `app.routing` policy in its own process (for benchmarks only).

`python -m benchmarks.http_router --port P --policy scored --worker-urls URL...` forwards
`POST /v1/completions` and `/v1/chat/completions` to the replica the policy picks, streaming the
answer back. It describes each replica by its own in-flight count (as the Ray Serve router does
when replicas report nothing else), tells the policy of first tokens (`on_first_token`, at the
first streamed chunk) and completions. It is NOT the stack's router: the stack routes inside
Ray Serve (`app/engines/router.py`; `ours-stack` in `benchmarks.peer_bench` runs it over HTTP via
`benchmarks.ray_fronts`). This stand-in puts the same policy code in front of the simulated servers
without Ray Serve's hops, to separate the policy's effect from the stack's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx

from app.routing import NoReplicaError, ReplicaStats, make_policy, view_of_body
from benchmarks.sim_server import Receive, Send, _json, read_body

# Idle connections to the simulators are dropped after 1 s, well before uvicorn's 5 s keep-alive
# timeout closes them from its side (reusing one as it closes fails the request).
KEEPALIVE_LIMITS = httpx.Limits(max_connections=1000, keepalive_expiry=1.0)


class PolicyRouter:
    """The ASGI app: one policy, a fixed list of worker URLs."""

    def __init__(
        self, policy: str, workers: list[str], max_concurrency: int = 32, cache_blocks: int = 2048
    ) -> None:
        settings: dict[str, Any] = {}
        if policy in ("prefix", "scored"):  # sized like the replicas, as the lab does
            settings = {"block_size": 16, "max_blocks": cache_blocks}
        self.policy = make_policy(policy, **settings)
        self.workers = workers
        self.max_concurrency = max_concurrency
        self.in_flight = dict.fromkeys(workers, 0)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=KEEPALIVE_LIMITS)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        path = scope["path"]
        if path in ("/health", "/v1/models"):
            reply = await self.client.get(self.workers[0] + path)
            await _json(send, reply.status_code, reply.json())
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            await _json(send, 404, {"error": {"message": f"no route {path}", "code": "not_found"}})
            return
        data = json.loads(body or b"{}")
        view = view_of_body(data, model="default")  # as the stack's router reads it
        stats = [
            ReplicaStats(w, in_flight=self.in_flight[w], max_concurrency=self.max_concurrency)
            for w in self.workers
        ]
        try:
            worker = self.policy.choose(view, stats).replica_id
        except NoReplicaError:
            await _json(send, 503, {"error": {"message": "no replica", "code": "unavailable"}})
            return
        self.in_flight[worker] += 1
        try:
            async with self.client.stream("POST", worker + path, content=body) as reply:
                headers = [(b"content-type", reply.headers.get("content-type", "").encode())]
                await send(
                    {"type": "http.response.start", "status": reply.status_code, "headers": headers}
                )
                started = False
                async for chunk in reply.aiter_raw():
                    if not started:
                        self.policy.on_first_token(view, worker)
                    started = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        finally:
            self.in_flight[worker] -= 1
            self.policy.on_complete(view, worker)


async def serve(
    port: int, policy: str, workers: list[str], cache_blocks: int, host: str = "127.0.0.1"
) -> None:
    import uvicorn

    app = PolicyRouter(policy, workers, cache_blocks=cache_blocks)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
    )
    await uvicorn.Server(config).serve()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--policy", default="scored")
    p.add_argument("--cache-blocks", type=int, default=2048)
    p.add_argument("--worker-urls", nargs="+", required=True)
    a = p.parse_args()
    asyncio.run(serve(a.port, a.policy, a.worker_urls, a.cache_blocks, a.host))


if __name__ == "__main__":
    main()
