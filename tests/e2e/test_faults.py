"""The fault matrix: one fault per test, under load, through HAProxy, our ingress replicas and
request router, in front of simulated engine replicas (`benchmarks.simulated_engine`). Loopback
only, bounded in count and time; no accepted request is lost (a stream whose engine dies goes on
at the other replica; what a killed ingress replica carried fails with a connection error or
HAProxy's own 500, which its client sends again). One deployment serves
every row (2 ingress and 2 engine replicas); the redeploy row comes last, then the one row with
a real vLLM engine (its engine core process killed, beside the others). An engine replica killed
under load is `test_reliability.py`'s `test_killing_an_engine_replica_under_load_fails_no_...`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from app.engines.http_server import ENGINE_UNAVAILABLE
from benchmarks.toy_model import next_token, prompt_ids, word
from tests.e2e.conftest import wait_healthy
from tests.e2e.test_reliability import (
    BODY,
    _fire,
    _replica_actor_names,
    deploy_simulated,
    ingress_rss_mb,
)
from tests.engine_double import events

pytestmark = pytest.mark.e2e
APP, ENGINE = "faults", "engine:sim"
SERVER = {"ingress_replicas": 2}
FAST_HEALTH = {"health_check_period_s": 1, "health_check_timeout_s": 5}


@pytest.fixture(scope="module")
def base(cluster) -> Iterator[str]:
    deploy(delay_s=0.2)
    wait_healthy(cluster.base_url)
    yield cluster.base_url
    serve.delete(APP)


def deploy(delay_s: float) -> None:
    deploy_simulated(APP, delay_s=delay_s, timeout_s=60, server=SERVER,
                     engine_options=FAST_HEALTH)  # fmt: skip


@dataclass
class Streamed:
    status: int
    replica: str | None
    events: list[Any]
    text: str

    @property
    def complete(self) -> bool:
        """Every token, then [DONE], no error."""
        return self.status == 200 and self.events[-1:] == ["[DONE]"] and not self.errors

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]


async def _streams(
    base: str, count: int, body: dict, *, first: dict | None = None
) -> list[Streamed]:
    """`count` streaming requests at once (the first with body `first`, if given)."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(i: int) -> Streamed:
            payload = {**(first if first is not None and i == 0 else body), "stream": True}
            try:
                async with client.stream("POST", "/v1/completions", json=payload) as response:
                    text = (await response.aread()).decode()
            except httpx.TransportError as exc:  # lost: the connection broke
                return Streamed(-1, None, [], f"{type(exc).__name__}: {exc}")
            replica = response.headers.get("x-route-replica")
            return Streamed(response.status_code, replica, events(text), text)

        return await asyncio.gather(*(one(i) for i in range(count)))


def model_status(base: str) -> dict[str, Any]:
    """The model's entry in an ingress's /status: `running_replicas` its router routes to,
    `replicas` (each engine replica's last reported stats)."""
    return httpx.get(f"{base}/status", timeout=10).json()["models"][0]


def replica_stats(base: str) -> dict[str, dict]:
    return model_status(base)["replicas"]


def until(check: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Seconds until `check()` holds (polled), or fail naming `what`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.25)
    return time.monotonic() - started


def replaced(base: str, victim: str) -> float:
    """Seconds until Serve has replaced the replica (its health check failed) and the ingress
    replicas' routers see its successor (four answers of /status in a row)."""
    seen = [0]

    def done() -> bool:
        names = _replica_actor_names(APP, ENGINE)
        model = model_status(base)
        ok = not any(n.endswith(victim) for n in names) and model["running_replicas"] == 2
        seen[0] = seen[0] + 1 if ok and victim not in model["replicas"] else 0
        return seen[0] >= 4

    return until(done, 60, f"replica {victim} replaced")


def fail_an_engine() -> str:
    """Stop one engine replica's engine (as vLLM's engine core dying); its replica id."""
    return serve.get_deployment_handle(ENGINE, APP).fail_engine.remote().result(timeout_s=30)


def later(delay_s: float, action: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# -- engine process death inside a live replica ---------------------------------------------
def refused_by(base: str, victim: str, timeout_s: float) -> threading.Event:
    """Set once the routers report that `victim` refused a request: /status polled every
    0.2 s, up to `timeout_s`, from now on. The replica's stats are in /status only until Serve
    replaces it, a few seconds after its engine died, which may come before a slow machine
    has sent all of its load."""
    seen = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not seen.is_set() and time.monotonic() < deadline:
            if replica_stats(base).get(victim, {}).get(ENGINE_UNAVAILABLE):
                seen.set()
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def test_engine_death_before_the_first_byte_is_retried_on_another_replica(base):
    victim = fail_an_engine()
    refused = refused_by(base, victim, 120)
    plain = asyncio.run(_fire(base, 40, 40, BODY))
    streams = asyncio.run(_streams(base, 40, BODY))
    took = replaced(base, victim)
    assert plain.count(200) == 40, plain
    assert all(s.complete for s in streams), [s.text for s in streams if not s.complete]
    assert victim not in {s.replica for s in streams}
    assert not any("EngineCore" in s.text for s in streams)
    assert refused.wait(120), "the routers never reported that the dead engine's replica refused"
    print(f"engine death before first byte: 80/80 answered; replaced {took:.1f} s after the "
          "load")  # fmt: skip


def test_engine_death_mid_stream_goes_on_at_the_other_replica(base):
    """The first stream's replica loses its engine 1.5 s in: its streams in progress go on at
    the other replica (`app.ingress.migration`), each with the text of an uninterrupted run of
    the simulator's toy model, and the migration's comment."""
    long = {**BODY, "max_tokens": 20, "simulate": {"delay_s": 4, "tokens": 20}}
    fatal = {**long, "simulate": {**long["simulate"], "engine_dies_after_s": 1.5}}
    streams = asyncio.run(_streams(base, 16, long, first=fatal))
    victim = streams[0].replica
    moved = [s for s in streams if s.replica == victim]
    assert len(streams) == 16 and victim is not None
    assert all(s.complete for s in streams), [s.text for s in streams if not s.complete]
    sequence = prompt_ids(BODY)
    for _ in range(20):
        sequence.append(next_token(sequence))
    expected = "".join(word(t) for t in sequence[len(prompt_ids(BODY)) :])
    for s in streams:
        assert "".join(e["choices"][0]["text"] for e in s.events if isinstance(e, dict)
                       and e.get("choices")) == expected  # fmt: skip
        assert (": vrstack-migrated 1 " in s.text) is (s.replica == victim)
    took = replaced(base, victim)
    print(f"engine death mid-stream: {len(moved)}/16 streams went on at the other replica, "
          f"text as uninterrupted; replaced in {took:.1f} s")  # fmt: skip


# -- the ingress and the Serve controller -----------------------------------------------------
def test_killing_an_ingress_replica_under_load_loses_no_request(base):
    """What the killed replica carried fails with a connection error or HAProxy's own 500,
    which the client may retry (OpenAI's clients do, twice by default); every other request is
    answered."""
    victims = _replica_actor_names(APP, "ingress")
    assert len(victims) == 2
    killer = later(1.5, lambda: ray.kill(ray.get_actor(victims[0], namespace="serve")))
    resent: list[int] = []
    codes = asyncio.run(_fire(base, 300, 20, BODY, resent))
    dropped = len(resent)
    killer.join()
    assert codes.count(200) == 300, {c: codes.count(c) for c in set(codes)}
    assert dropped <= 20  # at most what was in flight
    until(lambda: victims[0] not in _replica_actor_names(APP, "ingress"), 30, "ingress gone")
    print(f"ingress replica killed: 300/300 answered, {dropped} after one client retry")


def test_restarting_the_serve_controller_under_load_loses_no_request(base):
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    killer = later(1.5, lambda: ray.kill(controller, no_restart=False))
    codes = asyncio.run(_fire(base, 300, 20, BODY))
    killer.join()
    assert codes.count(200) == 300, {c: codes.count(c) for c in set(codes)}
    until(lambda: serve.status().applications[APP].status == "RUNNING", 60, "app running")


# -- clients ------------------------------------------------------------------------------------
def running(base: str) -> int:
    """Requests the engine replicas are generating now (their reported running count)."""
    return sum(stats.get("running", 0) for stats in replica_stats(base).values())


def open_stream(port: int, body: bytes, *, rcvbuf: int | None = None) -> socket.socket:
    """A raw client that sent a streaming request and read nothing yet."""
    sock = socket.create_connection(("127.0.0.1", port))
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock.sendall(head + body)
    return sock


def _stream_body(**simulate: float) -> bytes:
    import json

    return json.dumps({**BODY, "stream": True, "simulate": simulate}).encode()


def test_a_client_leaving_mid_stream_cancels_its_engine_request(base, cluster):
    until(lambda: running(base) == 0, 10, "engines idle")
    clients = [open_stream(cluster.http_port, _stream_body(delay_s=30, tokens=30))
               for _ in range(10)]  # fmt: skip
    try:
        for sock in clients:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has started
        until(lambda: running(base) >= 10, 10, "10 engine requests running")
    finally:
        for sock in clients:
            sock.close()
    took = until(lambda: running(base) == 0, 10, "engine requests cancelled")
    print(f"client disconnects: 10 running engine requests cancelled within {took:.1f} s")


def test_a_slow_reader_keeps_ingress_memory_bounded(base, cluster):
    """Readers that stop reading a fast, endless stream: back-pressure, not buffering."""
    endless = _stream_body(delay_s=0, tokens=5_000_000)
    with open_stream(cluster.http_port, endless) as fast:  # what one stream makes, read
        started, read = time.monotonic(), 0
        while time.monotonic() - started < 2:
            read += len(fast.recv(65536))
    rate_mb = read / 2 / 2**20
    # Held long enough that buffering would show (> 200 MiB unread), on a slow machine too.
    hold_s = min(40.0, max(12.0, 240 / (4 * rate_mb)))
    until(lambda: running(base) == 0, 10, "the fast reader's engine request cancelled")
    before = ingress_rss_mb(APP)
    clients = [open_stream(cluster.http_port, endless, rcvbuf=4096) for _ in range(4)]
    try:
        assert all(sock.recv(1024).startswith(b"HTTP/1.1 200") for sock in clients)
        time.sleep(hold_s)
        after = ingress_rss_mb(APP)
        assert running(base) >= 4  # still open: held back, not failed
    finally:
        for sock in clients:
            sock.close()
    until(lambda: running(base) == 0, 10, "slow readers' engine requests cancelled")
    unread_mb = 4 * hold_s * rate_mb  # what buffering every unread byte would hold
    assert unread_mb > 200 and after - before < 40, (rate_mb, before, after)
    print(f"4 slow readers, {hold_s:.0f} s: ingress RSS {before:.0f} -> {after:.0f} MiB "
          f"(a stream read makes {rate_mb:.1f} MiB/s: {unread_mb:.0f} MiB unread)")  # fmt: skip


# -- redeploy (last: it replaces every replica) ------------------------------------------------
def replica_names() -> set[str]:
    return set(_replica_actor_names(APP, ENGINE) + _replica_actor_names(APP, "ingress"))


def test_redeploying_keeps_streams_longer_than_rays_default_shutdown(base):
    """Streams of 25 s through a redeploy that replaces every replica (Ray's default graceful
    shutdown is 20 s)."""
    long = {**BODY, "simulate": {"delay_s": 25, "tokens": 25}}
    old = replica_names()
    updater = later(2, lambda: deploy(delay_s=0.1))  # engine and ingress options change
    started = time.monotonic()
    streams = asyncio.run(_streams(base, 8, long))
    updater.join()
    elapsed = time.monotonic() - started
    assert all(s.complete for s in streams), [s.text[-300:] for s in streams if not s.complete]
    assert all(sum("choices" in e for e in s.events[:-1]) >= 25 for s in streams)
    until(lambda: not old & replica_names(), 60, "every old replica stopped")
    codes = asyncio.run(_fire(base, 20, 20, BODY))
    assert codes.count(200) == 20
    print(f"redeploy: 8/8 streams of 25 s complete ({elapsed:.1f} s)")
