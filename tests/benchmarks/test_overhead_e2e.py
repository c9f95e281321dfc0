"""A bounded smoke run of the overhead benchmark (`benchmarks.overhead`): the zero-compute backend
directly and through our stack (Ray Serve proxy, ingress, request router, simulated engines)."""

from __future__ import annotations

import json

import pytest

from benchmarks.overhead import markdown, parser, run

pytestmark = pytest.mark.e2e


SMALL = ["--concurrency", "8", "--requests", "40", "--rounds", "2", "--warmup", "8"]
SMALL += ["--single", "5", "--max-tokens", "6", "--max-duration", "30"]


def test_overhead_bench_direct_and_ours_every_request_answered(cluster):
    args = parser().parse_args(["--targets", "direct", "ours", *SMALL])
    report = json.loads(json.dumps(run(args, serve_port=cluster.http_port)))
    assert set(report["levels"]) == {"8", "1"}
    for level, sent in (("8", 80), ("1", 10)):
        results = report["levels"][level]
        assert set(results) == {"direct", "ours"}
        for name, res in results.items():
            assert res["requests"] == sent and res["succeeded"] == sent, (level, name, res)
            assert res["errors"] == {}
            assert res["output_tokens"] == 6 * sent  # every stream carried max_tokens tokens
            for key in ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99", "itl_p50"):
                assert res[key] > 0, (level, name, key)
            assert res["requests_per_s"] > 0
            assert len(res["rounds"]) == 2
        assert results["direct"]["added_e2e_p50"] == 0.0
        ours = results["ours"]
        assert ours["added_e2e_p50"] == ours["e2e_p50"] - results["direct"]["e2e_p50"]
        assert ours["cpu_ms_per_request"]["ours: front"] > 0
    assert "| ours | 80 / 80 | 0 |" in markdown(report)
