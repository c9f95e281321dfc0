"""A short run of the soak (`benchmarks.soak`) through the real stack (HAProxy, our ingress,
request router, simulated engine replicas): nothing fails but what the clients dropped, every
answer is checked, the ingress is sampled, and nothing is left in flight."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.soak import markdown, parser, run, slope_per_hour

SHORT = ["--minutes", "0.5", "--concurrency", "16", "--sample-s", "2", "--settle-s", "20"]


@pytest.fixture(scope="module")
def report(cluster) -> dict[str, Any]:
    return json.loads(json.dumps(run(parser().parse_args(SHORT), serve_port=cluster.http_port)))


@pytest.mark.e2e
def test_soak_fails_no_request_and_leaves_nothing_in_flight(report):
    outcomes = report["outcomes"]
    assert report["5xx"] == 0, report["statuses"]
    assert report["failures"] == 0, outcomes
    assert report["shape_violations"]["error_body"] == 0, report["violation_examples"]
    assert outcomes["ok"] > 200 and outcomes["left"] > 20, outcomes  # both kinds happened
    assert report["requests"] == sum(outcomes.values())
    assert 28 <= report["duration_s"] <= 30 + 60 + 10  # the load's time, bounded by its time-out
    assert report["in_flight_after"] == {"ingress": 0, "replicas": 0, "replicas_running": 0}
    samples = report["samples"]
    assert len(samples) >= 14 and all(s["rss_mib"] > 50 and s["fds"] > 0 for s in samples)
    assert report["rss_mib_per_hour"] is not None and report["fds_per_hour"] is not None
    assert "| 5xx | 0 |" in markdown(report)


@pytest.mark.e2e
def test_soak_every_answer_carries_one_request_id(report):
    assert report["shape_violations"]["request_id"] == 0, report["violation_examples"]


def test_slope_is_least_squares_over_the_second_half():
    flat_then_rising = [{"t": t, "y": 0.0 if t < 50 else (t - 50) / 3600} for t in range(100)]
    assert slope_per_hour(flat_then_rising, "y") == pytest.approx(1.0)
    assert slope_per_hour([{"t": 0, "y": 5}], "y") is None
    assert slope_per_hour([{"t": 1, "y": 5}, {"t": 1, "y": 6}], "y") is None
