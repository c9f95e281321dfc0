"""The stack's /metrics under a real Prometheus: every Grafana panel's PromQL has data.

A Prometheus server (Debian's `prometheus` package; `.ci/run` installs it) scrapes the running
smollm2 stack every second on the loopback interface; after real traffic (plain, streamed, with
and without `stream_options.include_usage`, repeated prompts for prefix-cache hits), every
expression of every dashboard panel is evaluated through Prometheus' HTTP API and must return a
non-empty result.

Its test runs on `tests/e2e/test_smollm2_cpu.py`'s stack (imported there: one engine start
fewer in the suite).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.observability import dashboard
from benchmarks.processes import free_port
from tests.e2e.conftest import Stack

PROMETHEUS = shutil.which("prometheus")
MODEL = "smollm2"


@pytest.fixture  # stopped after its test (the module's other tests go on without it)
def prometheus(smollm2: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("no `prometheus` binary (apt-get install -y prometheus; .ci/run does)")
    folder: Path = tmp_path_factory.mktemp("prometheus")
    target = smollm2.base_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "vrstack",
                "metrics_path": "/metrics",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (folder / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def query(url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(url: str, expr: str, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(url, expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(1)


def send_traffic(base_url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    # a shared prefix of several KV blocks (vLLM's CPU block size is 128 tokens)
    shared = "You are a helpful assistant. Answer in one short sentence. " * 32
    for i in range(3):  # the same long prefix: the engine's prefix cache hits
        client.completions.create(model=MODEL, prompt=f"{shared}Q{i}: 1, 2, 3,", max_tokens=6)
    client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi!"}], max_tokens=6
    )
    chunks = client.completions.create(
        model=MODEL, prompt=f"{shared}Count: 1, 2,", max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[0].completion_tokens > 0


def test_every_dashboard_panel_has_data_in_prometheus(smollm2: Stack, prometheus: str):
    text = httpx.get(f"{smollm2.base_url}/metrics", timeout=10).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"vrstack_requests", "vrstack_model_replicas_available"} <= names
    assert wait_for(prometheus, 'up{job="vrstack"} == 1'), "prometheus never scraped the stack"

    # A first request creates the routing-decision series; rates need a rise after that.
    httpx.post(
        f"{smollm2.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 2},
        timeout=120,
    ).raise_for_status()
    time.sleep(3)
    started = time.monotonic()
    send_traffic(smollm2.base_url)
    traffic_s = time.monotonic() - started

    # Engine state reaches the ingress through Serve's routing stats (every 2 s); rates need
    # two scrapes after the traffic.
    expressions = [e.replace("$model", ".*") for e in dashboard.expressions()]
    # This stack serves no LoRA adapter: those panels' queries must be valid, and are empty.
    lora = [e for e in expressions if "vrstack_lora_" in e]
    assert lora and all(query(prometheus, e) == [] for e in lora)
    expressions = [e for e in expressions if e not in lora]
    empty = expressions
    deadline = time.monotonic() + 90
    while empty and time.monotonic() < deadline:
        time.sleep(2)
        empty = [e for e in expressions if not query(prometheus, e)]
    assert not empty, f"panels without data: {empty}"

    def scalar(expr: str) -> float:
        (sample,) = query(prometheus, expr)
        return float(sample["value"][1])

    assert scalar(f'sum(vrstack_requests_total{{model="{MODEL}",status="200"}})') == 7
    assert scalar(f'sum(vrstack_model_replicas_available{{model="{MODEL}"}})') == 1
    assert scalar(f'sum(vrstack_output_tokens_total{{model="{MODEL}"}})') > 0
    assert scalar(f'sum(vrstack_prompt_tokens_total{{model="{MODEL}"}})') > 0
    assert scalar(f'sum(vrstack_routing_decisions_total{{model="{MODEL}"}})') == 7
    for expr in expressions:  # rates and quantiles are numbers, not NaN
        values = [float(s["value"][1]) for s in query(prometheus, expr)]
        if "prefix_cache_hits" not in expr:  # 0/0 while the engine looked nothing up
            assert any(math.isfinite(v) for v in values), (expr, values)
    ttft_buckets = "rate(vrstack_time_to_first_token_seconds_bucket[1m])"
    ttft = scalar(f"histogram_quantile(0.5, sum by (le) ({ttft_buckets}))")
    assert math.isfinite(ttft) and 0 < ttft < traffic_s
    queried = wait_for(
        prometheus, f'vrstack_engine_prefix_cache_queries_tokens_total{{model="{MODEL}"}} > 0'
    )
    assert queried, "the engine's prefix-cache counters never reached the ingress"
    kv = query(prometheus, 'vllm:gpu_cache_usage_perc{model="smollm2"}')
    assert kv and 0 <= float(kv[0]["value"][1]) <= 1
    hits = wait_for(
        prometheus, f'vrstack_engine_prefix_cache_hits_tokens_total{{model="{MODEL}"}} > 0'
    )
    assert hits, "repeated prompts never hit the prefix cache"
    print(
        f"traffic {traffic_s:.1f}s, ttft p50 {ttft:.3f}s, prefix-cache hit tokens "
        f"{hits[0]['value'][1] if hits else None} of {queried[0]['value'][1]}"
    )
