"""The pure parts of the overhead benchmark (`benchmarks.overhead`) and its zero-compute backend."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from app.bench.summary import RequestRecord
from benchmarks.overhead import (
    MODEL,
    CpuMeter,
    Target,
    added_latency,
    cpu_delta,
    cpu_table,
    pooled,
    table,
    top_frames,
)
from benchmarks.sim_server import ZERO_COST, App, SimulatedServer


def _record(ttft: float, e2e: float, status: str = "ok") -> RequestRecord:
    return RequestRecord(start=0.0, status=status, ttft=ttft, e2e=e2e, itl=[0.001, 0.003])


def _target(name: str, ttfts: list[float], e2e_extra: float, failed: int = 0) -> Target:
    t = Target(name, "http://127.0.0.1:1")
    t.records = [_record(x, x + e2e_extra) for x in ttfts]
    t.records += [_record(0.0, 0.0, status="500") for _ in range(failed)]
    t.duration_s = t.wall_s = 2.0
    t.cpu_s.update({"machine": 1.0, "backend": 0.5})
    half = len(ttfts) // 2
    t.runs = [
        {"ttft_p50": ttfts[0], "e2e_p50": ttfts[0] + e2e_extra},
        {"ttft_p50": ttfts[half], "e2e_p50": ttfts[half] + e2e_extra},
    ]
    return t


def test_pooled_figures_and_cpu_per_request() -> None:
    res = pooled(_target("direct", [0.001, 0.002, 0.003, 0.004, 0.005], 0.010, failed=1))
    assert res["requests"] == 6 and res["succeeded"] == 5
    assert res["errors"] == {"500": 1}
    assert res["ttft_p50"] == pytest.approx(0.003)
    assert res["e2e_p50"] == pytest.approx(0.013)
    assert res["itl_p50"] == pytest.approx(0.002)
    assert res["requests_per_s"] == pytest.approx(2.5)
    assert res["cpu_ms_per_request"]["backend"] == pytest.approx(100.0)  # 0.5 s / 5 answered


def test_added_latency_is_the_p50_difference_to_direct() -> None:
    results = {
        "direct": pooled(_target("direct", [0.001, 0.002, 0.003], 0.010)),
        "ours": pooled(_target("ours", [0.011, 0.012, 0.013], 0.030)),
    }
    added_latency(results)
    ours, direct = results["ours"], results["direct"]
    assert ours["added_ttft_p50"] == pytest.approx(0.010)
    assert ours["added_e2e_p50"] == pytest.approx(0.030)  # 0.042 - 0.012
    assert ours["added_ttft_p50_rounds_median"] == pytest.approx(0.010)
    assert direct["added_e2e_p50"] == 0.0


def test_added_latency_without_a_baseline_is_unknown() -> None:
    results = {"ours": pooled(_target("ours", [0.01, 0.02], 0.0))}
    added_latency(results)
    assert results["ours"]["added_ttft_p50"] is None


def test_tables_name_every_target_and_failures() -> None:
    results = {
        "direct": pooled(_target("direct", [0.001, 0.002, 0.003], 0.010)),
        "stock": {"error": "could not deploy"},
    }
    added_latency(results)
    text = table(results)
    assert "| direct | 3 / 3 | 0 | 2 | 2.00 |" in text
    assert "| stock | could not run: could not deploy |" in text
    cpu = cpu_table(results)
    # load generator (none measured), backend, path (none for direct), machine, machine busy
    assert "| direct | 0.00 | 166.67 | 0.00 | 333.33 | 25% |" in cpu and "stock" not in cpu


def test_a_serve_targets_path_is_its_replicas_with_haproxy_and_the_proxy() -> None:
    t = _target("ours", [0.01, 0.02], 0.0)
    t.cpu_s.update({"ours: front": 0.2, "haproxy": 0.1, "serve proxy": 0.02, "stock: front": 5})
    t.cpu_s.update({"ours: engines": 0.3})
    assert pooled(t)["path_cpu_ms_per_request"] == pytest.approx(160.0)  # 0.32 s / 2 answered
    assert pooled(t)["backend_cpu_ms_per_request"] == pytest.approx(150.0)
    t = _target("vllm-router", [0.01, 0.02], 0.0)
    t.cpu_s.update({"vllm-router": 0.1, "haproxy": 9.0})
    assert pooled(t)["path_cpu_ms_per_request"] == pytest.approx(50.0)


def test_the_cpu_meter_counts_a_process_started_between_its_reads() -> None:
    """HAProxy starts a new process on each reload: a group found by pattern counts it."""
    mark = f"vrstack-meter-{uuid.uuid4().hex}"
    burn = (
        f"import time; t = time.process_time(); {mark!r}\nwhile time.process_time() - t < 0.3: pass"
    )
    meter = CpuMeter()
    meter.find({"burner": mark, "absent": f"{mark}-nothing"})
    before = meter.read()
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=30)  # ends before `after`
    proc = subprocess.Popen([sys.executable, "-c", burn + "\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while (cpu := cpu_delta(before, meter.read()))["burner"] < 0.3:
            assert time.monotonic() < deadline, cpu
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    # The live newcomer's 0.3 s at least (the first one ended unseen: not counted), none twice.
    assert 0.3 <= cpu["burner"] < 0.55 and cpu["absent"] == 0.0
    assert cpu["machine"] >= cpu["burner"] - 0.05


def test_top_frames_shares_merge_lines_of_one_function() -> None:
    collapsed = "\n".join(
        [
            "main (a.py:1);work (a.py:10);leaf (b.py:3) 6",
            "main (a.py:1);work (a.py:12) 3",
            "main (a.py:2);other (c.py:5) 1",
            "garbage line",
        ]
    )
    top = top_frames(collapsed, n=3)
    assert top["samples"] == [("samples", 10.0)]
    assert top["self"][0] == ("leaf (b.py)", pytest.approx(0.6))
    assert dict(top["self"])["work (a.py)"] == pytest.approx(0.3)
    assert dict(top["total"])["main (a.py)"] == pytest.approx(1.0)
    assert dict(top["total"])["work (a.py)"] == pytest.approx(0.9)


async def _call(app: App, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_zero_compute_backend_streams_max_tokens_chunks(path: str) -> None:
    app = App(SimulatedServer("zero", ZERO_COST, MODEL))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 7, "stream": True}
    body["stream_options"] = {"include_usage": True}
    sent = asyncio.run(_call(app, path, body))
    assert sent[0]["status"] == 200
    events = b"".join(m.get("body", b"") for m in sent[1:]).decode().split("\n\n")
    events = [e.removeprefix("data: ") for e in events if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c for c in chunks if c["choices"]]
    assert len(texts) == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert not sent[-1].get("more_body")


def test_zero_compute_backend_answers_plain_requests_at_once() -> None:
    app = App(SimulatedServer("zero", ZERO_COST, MODEL))
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    sent = asyncio.run(_call(app, "/v1/completions", body))
    answer = json.loads(sent[1]["body"])
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["choices"][0]["text"] == "sim sim sim "
