"""The peer benchmark's figures and target check (`benchmarks.peer_bench`), from plain results."""

from __future__ import annotations

import pytest

from benchmarks.peer_bench import Outcome, check_targets, figures, table


def _server(prompt: int, cached: int, ttfts: list[float], requests: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "model_ttft_s": ttfts,
        "ttft_s": [t + 0.001 for t in ttfts],  # slept: the model's times plus jitter
        "requests": requests,
        "max_in_flight": 2,
        "mean_in_flight": 1.0,
        "calls": {"/v1/completions": requests},
    }


def _outcomes(n: int, ttft: float) -> list[Outcome]:
    return [Outcome(True, start=float(i), ttft=ttft, end=i + 1.0) for i in range(n)]


def test_modelled_ttft_is_pooled_from_the_replicas_and_decides_the_ttft_target():
    servers = [_server(100, 80, [0.01] * 9 + [0.5], 10), _server(100, 60, [0.02] * 10, 10)]
    ours = {"router": "ours-stack:scored", **figures(_outcomes(20, 0.9), servers)}
    assert ours["hit_rate"] == pytest.approx(0.7)
    assert ours["modelled_ttft_p50_ms"] == pytest.approx(20)
    assert ours["modelled_ttft_p99_ms"] == pytest.approx(500)
    peer_servers = [_server(100, 70, [0.6] * 10, 10), _server(100, 70, [0.6] * 10, 10)]
    peer = {"router": "vllm-router:cache_aware", **figures(_outcomes(20, 0.1), peer_servers)}
    t = check_targets([peer, ours], "ours-stack:scored", oracle=0.7)
    # Faster where the routing decides (modelled), slower at the client (the path's own cost).
    assert t["modelled_ttft_p99_minus_best_peer_ms"] == pytest.approx(-100)
    assert t["ttft_p99_minus_best_peer_ms"] == pytest.approx(800)
    assert t["met"] == {
        "hit_vs_oracle": True, "hit_vs_peers": True, "load": True, "modelled_ttft_p99": True
    }  # fmt: skip
    assert "| 20 / 500 | 900 / 900 |" in table([ours], 0.7)


def test_without_modelled_ttfts_the_ttft_target_is_not_met():
    servers = [{**_server(100, 50, [], 5)}]
    ours = {"router": "ours-stack:scored", **figures(_outcomes(5, 0.1), servers)}
    peer = {"router": "sglang-router:cache_aware", **figures(_outcomes(5, 0.1), servers)}
    t = check_targets([peer, ours], "ours-stack:scored", oracle=0.5)
    assert ours["modelled_ttft_p99_ms"] is None
    assert t["modelled_ttft_p99_minus_best_peer_ms"] is None
    assert not t["met"]["modelled_ttft_p99"]
    assert "| - |" in table([ours], 0.5)


def test_free_ports_are_distinct():
    from benchmarks.processes import free_ports

    ports = free_ports(16)
    assert len(set(ports)) == 16 and all(1024 <= p < 65536 for p in ports)
