"""An OpenAI-compatible HTTP *simulator* of vLLM replicas, not an engine: `benchmarks.sim_server`.

Each simulated replica listens on its own loopback port (all in one process and event loop) and
keeps the cache model of the lab's `SimulatedReplica` (`app/lab/simulator.py`), in real time:
- a block-level prefix cache of `cache_blocks` blocks with LRU eviction, keyed by the routing
  layer's block hashes of the prompt text (one token per 4 UTF-8 bytes); a prompt's full blocks
  are stored when its prefill ends, child-first; generated tokens are not cached;
- at most `max_concurrency` admitted requests (more wait, FIFO);
- one prefill at a time (FIFO), `prefill_overhead + prefill_cost * uncached prompt tokens`,
  the cached tokens being the prompt's leading blocks found in the cache when its prefill starts;
- decode beside other requests, `decode_cost * max_tokens` after the prefill.
The modelled times are really slept, multiplied by `time_scale` (e.g. 0.25 to run 4x faster), so
routers see the load. Modelled TTFTs are also computed, free of the sleeps' wall-clock jitter: each
replica's requests are replayed through the lab's model (`app.lab.simulator.replay`, one replica)
at their modelled arrival times, the trace's times when a benchmark posted them
(`POST /sim/schedule`), else the wall time since the last reset / `time_scale`.
Responses are OpenAI-shaped and report `usage.prompt_tokens_details.cached_tokens`; streams send
the first token when the prefill ends. No text is generated: the output is `max_tokens` dummy
words. It also answers what peer routers probe: `/health`, `/v1/models`, `/tokenize`,
`/v1/completions/render`, `/server_info`, `/model_info`, `/get_server_info`, `/get_model_info`,
`/metrics`; and `GET /sim/stats`, `POST /sim/reset`, `POST /sim/schedule` for benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from app.engines.http_server import route_path
from app.lab.simulator import BlockCache, SimSettings, replay
from app.lab.trace import TraceRequest
from app.routing import RequestView, make_policy, prompt_text

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
_RECORDED = 100_000  # requests kept per replica for the modelled TTFTs
_EVENT_STREAM = (b"content-type", b"text/event-stream")
# The zero-compute backend of the overhead benchmark: no modelled cost, streams sent at once.
ZERO_COST = SimSettings(max_concurrency=1 << 20, prefill_cost=0, prefill_overhead=0, decode_cost=0)


def token_ids(text: str) -> list[int]:
    """Deterministic fake token ids: one per 4 UTF-8 bytes (the routing layer's approximation)."""
    data = text.encode()
    return [zlib.crc32(data[i : i + 4]) % 50_000 for i in range(0, len(data), 4)]


def arrival_key(text: str) -> str:
    """The key of a prompt in a schedule (`POST /sim/schedule`): a digest of its text."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class SimulatedServer:
    """One simulated replica: the lab's cache and cost model behind OpenAI-shaped HTTP."""

    def __init__(
        self, name: str, settings: SimSettings, model: str = "default", time_scale: float = 1.0
    ) -> None:
        self.name = name
        self.s = settings
        self.model = model
        self.time_scale = time_scale
        self.reset()

    def reset(self) -> None:
        """Cold cache, zero counters."""
        self.cache = BlockCache(self.s.cache_blocks)
        self.admission = asyncio.Semaphore(self.s.max_concurrency)
        self.prefill_lock = asyncio.Lock()  # FIFO: one prefill at a time
        self.requests = self.prompt_tokens = self.cached_tokens = 0
        self.in_flight = self.max_in_flight = 0
        self.ttfts: list[float] = []  # wall seconds / time_scale, arrival here to first token
        self.calls: dict[str, int] = {}  # requests per path (what routers probe)
        self.arrivals: dict[str, deque[float]] = {}  # arrival_key -> modelled arrival times
        # At modelled arrival times, in arrival order; the latest `_RECORDED` requests only.
        self.received: deque[TraceRequest] = deque(maxlen=_RECORDED)
        self.scheduled = 0  # how many of them had a posted arrival time
        self._area = 0.0
        self._since = self._last = time.monotonic()

    def _account(self, delta: int) -> None:
        now = time.monotonic()
        self._area += self.in_flight * (now - self._last)
        self._last = now
        self.in_flight += delta
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def schedule(self, arrivals: Iterable[tuple[str, float]]) -> None:
        """Modelled arrival times (seconds) by `arrival_key`; a key may come several times."""
        for key, t in sorted(arrivals, key=lambda item: item[1]):
            self.arrivals.setdefault(key, deque()).append(t)

    def modelled_ttfts(self) -> tuple[list[float], int]:
        """(TTFT of each request received, cached tokens in all) from the lab's model of this
        replica over the requests at their modelled arrival times: no wall-clock jitter."""
        if not self.received:
            return [], 0
        result = replay(list(self.received), make_policy("round_robin"), 1, self.s)
        return [job.ttft for job in result.jobs], sum(job.cached_tokens for job in result.jobs)

    def stats(self) -> dict[str, Any]:
        self._account(0)
        span = max(1e-9, self._last - self._since)
        model_ttfts, model_cached = self.modelled_ttfts()
        return {
            "replica": self.name,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "max_in_flight": self.max_in_flight,
            "mean_in_flight": self._area / span,
            "cache_blocks_used": len(self.cache),
            "ttft_s": list(self.ttfts),
            "model_ttft_s": model_ttfts,
            "model_cached_tokens": model_cached,
            "scheduled": self.scheduled,
            "calls": dict(self.calls),
        }

    async def run(self, text: str, max_tokens: int, on_first_token: Callable[[], Awaitable[None]]):
        """Admit, prefill, call `on_first_token`, decode; returns (prompt, cached) tokens.

        Records the request's modelled TTFT: from its arrival at this replica to its first
        token (admission wait, prefill queue and prefill), wall time / `time_scale`, and the
        request at its modelled arrival time for `modelled_ttfts`."""
        arrived = time.monotonic()
        times = self.arrivals.get(arrival_key(text))
        if times:
            at = times.popleft()
            self.scheduled += 1
        else:
            at = (arrived - self._since) / self.time_scale
        self.received.append(TraceRequest(at, self.model, prompt=text, max_tokens=max_tokens))
        view = RequestView(self.model, text=text)
        hashes = view.block_hashes(self.s.block_size)
        prompt = max(1, view.prompt_tokens)
        self._account(+1)
        try:
            async with self.admission:
                async with self.prefill_lock:
                    cached = min(prompt, self.cache.prefix(hashes) * self.s.block_size)
                    cost = self.s.prefill_overhead + self.s.prefill_cost * (prompt - cached)
                    await asyncio.sleep(cost * self.time_scale)
                    self.cache.store(hashes)
                self.requests += 1
                self.prompt_tokens += prompt
                self.cached_tokens += cached
                self.ttfts.append((time.monotonic() - arrived) / self.time_scale)
                await on_first_token()
                await asyncio.sleep(self.s.decode_cost * max_tokens * self.time_scale)
        finally:
            self._account(-1)
        return prompt, cached


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The prompt as text (`app.routing.prompt_text`): a chat body's messages, else `prompt`."""
    return prompt_text(
        {"messages": body.get("messages")} if chat else {"prompt": body.get("prompt")}
    )


def _arrivals(body: dict[str, Any]) -> list[tuple[str, float]] | None:
    """`{"arrivals": [[key, seconds], ...]}` as (key, seconds) pairs; None if it is not that."""
    items = body.get("arrivals")
    if not isinstance(items, list):
        return None
    pairs = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        t = item[1]
        if isinstance(t, bool) or not isinstance(t, int | float):
            return None
        pairs.append((item[0], float(t)))
    return pairs


def _usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class App:
    """The ASGI app of one simulated replica."""

    def __init__(self, server: SimulatedServer) -> None:
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], route_path(scope)
        body = await read_body(receive)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            await _json(send, 400, _error("invalid JSON body"))
            return
        if not isinstance(data, dict):
            data = {}
        srv = self.server
        if not path.startswith("/sim/"):
            srv.calls[path] = srv.calls.get(path, 0) + 1
        if path in ("/v1/completions", "/v1/chat/completions", "/completions") and method == "POST":
            await self.generate(send, data, chat=path.endswith("chat/completions"))
        elif path in ("/health", "/healthz", "/ping", "/health_generate"):
            await _json(send, 200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            model = {"id": srv.model, "object": "model", "owned_by": "simulator", "root": srv.model}
            await _json(send, 200, {"object": "list", "data": [model]})
        elif path in ("/tokenize", "/v1/tokenize"):
            text = str(data.get("prompt", "")) if "prompt" in data else _prompt_text(data, True)
            ids = token_ids(text)
            await _json(send, 200, {"count": len(ids), "max_model_len": 1 << 20, "tokens": ids})
        elif path == "/v1/completions/render":
            ids = token_ids(_prompt_text(data, False))
            await _json(send, 200, [{"prompt_token_ids": ids, "token_ids": ids}])
        elif path == "/v1/chat/completions/render":
            ids = token_ids(_prompt_text(data, True))
            await _json(send, 200, [{"prompt_token_ids": ids, "token_ids": ids}])
        elif path in ("/server_info", "/get_server_info"):
            await _json(send, 200, self.info())
        elif path in ("/model_info", "/get_model_info"):
            await _json(
                send, 200, {"model_path": srv.model, "tokenizer_path": None, "is_generation": True}
            )
        elif path == "/metrics":
            text = f"vllm:num_requests_running {srv.in_flight}\nvllm:num_requests_waiting 0\n"
            await _raw(send, 200, text.encode(), b"text/plain")
        elif path == "/sim/stats":
            await _json(send, 200, srv.stats())
        elif path == "/sim/reset" and method == "POST":
            srv.reset()
            await _json(send, 200, {"reset": True})
        elif path == "/sim/schedule" and method == "POST":
            arrivals = _arrivals(data)
            if arrivals is None:
                await _json(send, 400, _error("arrivals must be a list of [key, seconds] pairs"))
                return
            srv.schedule(arrivals)
            await _json(send, 200, {"scheduled": len(arrivals)})
        else:
            await _json(send, 404, _error(f"no route {method} {path}", "not_found"))

    def info(self) -> dict[str, Any]:
        s = self.server.s
        return {
            "simulator": True,
            "model_path": self.server.model,
            "served_model_name": self.server.model,
            "tokenizer_path": None,
            "skip_tokenizer_init": True,
            "page_size": s.block_size,
            "max_running_requests": s.max_concurrency,
            "max_total_num_tokens": s.cache_blocks * s.block_size,
        }

    async def generate(self, send: Send, data: dict[str, Any], chat: bool) -> None:
        srv = self.server
        max_tokens = data.get("max_tokens") or data.get("max_completion_tokens") or 16
        try:
            max_tokens = max(1, int(max_tokens))
        except (TypeError, ValueError):
            await _json(send, 400, _error("max_tokens must be an integer"))
            return
        stream = bool(data.get("stream"))
        if stream and srv.s == ZERO_COST:
            await self.stream_at_once(send, data, chat, max_tokens)
            return
        text = _prompt_text(data, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        model = str(data.get("model") or srv.model)
        kind = "chat.completion" if chat else "text_completion"
        words = "sim " * max_tokens

        def choice(piece: str, finish: str | None) -> dict[str, Any]:
            if chat:
                key = "delta" if stream else "message"
                return {
                    "index": 0,
                    key: {"role": "assistant", "content": piece},
                    "finish_reason": finish,
                }
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}

        async def first_token() -> None:
            if stream:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [_EVENT_STREAM]}
                )
                chunk = {
                    "id": rid,
                    "object": kind + (".chunk" if chat else ""),
                    "created": created,
                    "model": model,
                    "choices": [choice("sim ", None)],
                }
                await _event(send, chunk)

        prompt, cached = await srv.run(text, max_tokens, first_token)
        usage = _usage(prompt, cached, max_tokens)
        if not stream:
            await _json(
                send,
                200,
                {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": [choice(words, "length")],
                    "usage": usage,
                },
            )
            return
        last = {
            "id": rid,
            "object": kind + (".chunk" if chat else ""),
            "created": created,
            "model": model,
            "choices": [choice(words[4:], "length")],
            "usage": usage,
        }
        await _event(send, last)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def stream_at_once(
        self, send: Send, data: dict[str, Any], chat: bool, tokens: int
    ) -> None:
        """The zero-compute backend's stream: `tokens` chunks at once, with no cache model (a
        usage chunk when asked), then `[DONE]`."""
        self.server.requests += 1
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time())}
        head["model"] = str(data.get("model") or self.server.model)
        if chat:
            choice = {"index": 0, "delta": {"content": "sim "}, "finish_reason": None}
            head["object"] = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": "sim ", "logprobs": None, "finish_reason": None}
            head["object"] = "text_completion"
        chunk = b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"
        start = {"type": "http.response.start", "status": 200, "headers": [_EVENT_STREAM]}
        await send(start)
        for _ in range(tokens):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = b""
        if (data.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
            tail = b"data: " + json.dumps({**head, "choices": [], "usage": usage}).encode()
            tail += b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})


def _error(message: str, code: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


async def _event(send: Send, obj: dict[str, Any]) -> None:
    body = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def read_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI HTTP request."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _json(send: Send, status: int, obj: Any) -> None:
    await _raw(send, status, json.dumps(obj, separators=(",", ":")).encode(), b"application/json")


async def _raw(send: Send, status: int, body: bytes, ctype: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve(
    ports: list[int],
    settings: SimSettings,
    model: str = "default",
    time_scale: float = 1.0,
    host: str = "127.0.0.1",
) -> None:
    """Serve one simulated replica per port until cancelled."""
    import uvicorn

    servers = []
    for port in ports:
        app = App(SimulatedServer(f"sim-{port}", settings, model, time_scale))
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        servers.append(uvicorn.Server(config))
    await asyncio.gather(*(s.serve() for s in servers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ports", type=int, nargs="+", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="default")
    p.add_argument("--time-scale", type=float, default=1.0, help="Sleep this x the modelled time.")
    p.add_argument("--cache-blocks", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--prefill-cost", type=float, default=0.0002)
    p.add_argument("--prefill-overhead", type=float, default=0.005)
    p.add_argument("--decode-cost", type=float, default=0.01)
    a = p.parse_args()
    settings = SimSettings(
        cache_blocks=a.cache_blocks,
        block_size=a.block_size,
        max_concurrency=a.max_concurrency,
        prefill_cost=a.prefill_cost,
        prefill_overhead=a.prefill_overhead,
        decode_cost=a.decode_cost,
    )
    asyncio.run(serve(a.ports, settings, a.model, a.time_scale, a.host))


if __name__ == "__main__":
    main()
