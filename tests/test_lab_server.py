"""The HTTP engine simulator (`app.lab.server`): OpenAI-shaped answers, a prefix cache."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx

from app.lab.server import serve
from app.lab.simulator import SimSettings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _exercise(port: int) -> list:
    task = asyncio.create_task(serve([port], SimSettings(cache_blocks=64), time_scale=0.01))
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(100):
                try:
                    if (await client.get(url + "/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.05)
            prompt = "the same long system prompt " * 40
            body = {"model": "default", "prompt": prompt, "max_tokens": 4}
            first = (await client.post(url + "/v1/completions", json=body)).json()
            second = (await client.post(url + "/v1/completions", json=body)).json()
            chat = {"model": "default", "messages": [{"role": "user", "content": prompt}]}
            stream = await client.post(
                url + "/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 3}
            )
            models = (await client.get(url + "/v1/models")).json()
            tokens = (await client.post(url + "/tokenize", json={"prompt": prompt})).json()
            missing = await client.get(url + "/nope")
            return [first, second, stream, models, tokens, missing]
    finally:
        task.cancel()


def test_second_identical_prompt_hits_the_cache_and_answers_are_openai_shaped():
    first, second, stream, models, tokens, missing = asyncio.run(_exercise(_free_port()))
    for reply in (first, second):
        assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
        assert reply["choices"][0]["finish_reason"] == "length"
        assert isinstance(reply["choices"][0]["text"], str)
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # "user: " first
    assert models["data"][0]["id"] == "default"
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert missing.status_code == 404 and "error" in missing.json()


def test_modelled_ttft_counts_the_prefill_queue_and_shrinks_with_cached_blocks():
    from app.lab.server import SimulatedServer

    settings = SimSettings(cache_blocks=256, prefill_cost=0.001, prefill_overhead=0.0)
    server = SimulatedServer("r0", settings, time_scale=0.05)
    prompt = "word " * 320  # 400 tokens: 0.4 s modelled prefill, 20 ms wall

    async def first_token() -> None:
        return None

    async def scenario() -> None:
        await server.run(prompt, 1, first_token)  # cold
        await server.run(prompt, 1, first_token)  # all full blocks cached
        # two new 400-token prompts at once: one prefill waits for the other
        await asyncio.gather(*(server.run(w * 320, 1, first_token) for w in ("abcd ", "wxyz ")))

    asyncio.run(scenario())
    cold, warm, *pair = server.stats()["ttft_s"]
    assert 0.4 <= cold < 0.7
    assert warm < 0.1
    assert min(pair) >= 0.4 and max(pair) >= 0.8  # the second prefill queued behind the first
