"""The quota soak's checks (`benchmarks.quota_soak`): each window bound, against a brute force
over every window of random admissions, and the cases where a quota holds or is exceeded."""

from __future__ import annotations

import random

import pytest

from benchmarks.quota_soak import (
    long_run_ratio,
    request_excess,
    steady_minute_ratio,
    stream_usage,
    token_excess,
)


def brute_request_excess(times: list[float], rate: float, burst: float) -> float:
    """Every window [times[i], times[j]]: admitted beyond burst + rate x length."""
    return max(
        [-burst]
        + [
            (j - i + 1) - burst - rate * (times[j] - times[i])
            for i in range(len(times))
            for j in range(i, len(times))
        ]
    )


def brute_token_excess(events: list[tuple[float, int]], per_minute: float) -> float:
    rate = per_minute / 60
    worst = -1.0
    for i in range(len(events)):
        for j in range(i, len(events)):
            admitted = sum(tokens for _, tokens in events[i : j + 1])
            refill = rate * (events[j][0] - events[i][0])
            worst = max(worst, (admitted - per_minute - refill) / per_minute)
    return worst


@pytest.mark.parametrize("seed", range(20))
def test_the_window_bounds_equal_a_brute_force_over_every_window(seed):
    rng = random.Random(seed)
    times = sorted(rng.uniform(0, 30) for _ in range(rng.randint(1, 40)))
    events = [(t, rng.randint(1, 300)) for t in times]
    rate, burst, per_minute = rng.uniform(0.5, 4), rng.uniform(1, 10), rng.uniform(200, 3000)
    assert request_excess(times, rate, burst) == pytest.approx(
        brute_request_excess(times, rate, burst)
    )
    assert token_excess(events, per_minute) == pytest.approx(brute_token_excess(events, per_minute))


def test_a_token_bucket_paced_exactly_holds_and_one_request_more_does_not():
    rate, burst = 2.0, 4
    times = [0.0] * burst + [0.5 * k for k in range(1, 41)]  # the burst, then at the rate
    assert request_excess(times, rate, burst) <= 0
    assert request_excess(sorted([*times, 10.0]), rate, burst) == pytest.approx(1)

    per_minute = 600  # 10 tokens a second
    paced = [(0.0, 600)] + [(float(s), 10) for s in range(1, 121)]
    assert token_excess(paced, per_minute) <= 0
    assert token_excess(sorted([*paced, (60.5, 60)]), per_minute) == pytest.approx(0.1)


def test_the_steady_minute_is_the_busiest_full_window_after_the_start():
    per_minute = 600
    events = [(float(s), 10) for s in range(0, 181)]  # exactly at the quota for 3 minutes
    assert steady_minute_ratio(events, per_minute, start_s=30) == pytest.approx(1.0)
    burst = sorted([*events, (100.0, 60)])  # one window gets 60 tokens more: 1.1
    assert steady_minute_ratio(burst, per_minute, start_s=30) == pytest.approx(1.1)
    assert steady_minute_ratio(events, per_minute, start_s=150) is None  # no full window left
    assert steady_minute_ratio([], per_minute, start_s=0) is None


def test_the_long_run_ratio_leaves_out_the_bucket_the_run_starts_with():
    assert long_run_ratio(600 + 10 * 600, 600, 600) == pytest.approx(1.0)  # full bucket + rate
    assert long_run_ratio(600 + 10 * 606, 600, 600) == pytest.approx(1.01)


def test_a_streams_usage_is_read_off_its_last_usage_chunk():
    text = (
        'data: {"choices":[{"text":"a"}]}\n\n'
        'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
        "data: [DONE]\n\n"
    )
    assert stream_usage(text) == 10
    assert stream_usage('data: {"choices":[{"text":"a"}]}\n\ndata: [DONE]\n\n') == 0
