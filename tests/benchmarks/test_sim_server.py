"""The HTTP engine simulator (`benchmarks.sim_server`): OpenAI-shaped answers, a prefix cache."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.lab.simulator import SimSettings
from benchmarks.processes import free_port
from benchmarks.sim_server import serve


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
    first, second, stream, models, tokens, missing = asyncio.run(_exercise(free_port()))
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
    from benchmarks.sim_server import SimulatedServer

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


def test_modelled_ttfts_follow_the_posted_schedule_not_the_wall_clock():
    from benchmarks.sim_server import SimulatedServer, arrival_key

    settings = SimSettings(cache_blocks=256, prefill_cost=0.001, prefill_overhead=0.0)
    server = SimulatedServer("r0", settings, time_scale=0.01)
    a, b, late = "abcd " * 320, "wxyz " * 320, "late " * 320  # 400 tokens: 0.4 s prefill each
    # b arrives 0.1 s after a (modelled), `late` after both prefills; all sent at once here
    server.schedule([(arrival_key(late), 5.0), (arrival_key(b), 0.1), (arrival_key(a), 0.0)])

    async def first_token() -> None:
        return None

    async def scenario() -> None:
        await asyncio.gather(*(server.run(p, 1, first_token) for p in (a, b, late)))
        await server.run(a, 1, first_token)  # not scheduled: wall time since reset

    asyncio.run(scenario())
    stats = server.stats()
    assert stats["scheduled"] == 3 and stats["requests"] == 4
    modelled = stats["model_ttft_s"]
    assert modelled[:3] == [pytest.approx(0.4), pytest.approx(0.7), pytest.approx(0.4)]
    # sent at once, b and `late` waited in wall time too: their slept TTFTs are not the model's
    assert stats["ttft_s"][2] > 0.7
    # the unscheduled repeat of a comes after a's prefill (>= 12 ms wall = 1.2 s modelled):
    # all 25 of its blocks cached, nothing left to prefill
    assert modelled[3] == 0.0 and stats["model_cached_tokens"] == 400


def test_a_bad_schedule_is_a_400_in_openai_shape():
    async def post(port: int):
        task = asyncio.create_task(serve([port], SimSettings(), time_scale=0.01))
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                for _ in range(100):
                    try:
                        await client.get(f"http://127.0.0.1:{port}/health")
                        break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.05)
                url = f"http://127.0.0.1:{port}/sim/schedule"
                bad = [
                    await client.post(url, json={"arrivals": body})
                    for body in ([["k", "soon"]], "12", {"k": 1}, [["k", 1, 2]], [[3, 1.0]], None)
                ]
                good = await client.post(url, json={"arrivals": [["k", 1.5], ["k", 0]]})
                return bad, good
        finally:
            task.cancel()

    bad, good = asyncio.run(post(free_port()))
    for reply in bad:
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert good.status_code == 200 and good.json() == {"scheduled": 2}
