"""Micro-benchmark: the cost of one routing decision (`python -m benchmarks.decision_cost`).

Fills a policy's index with `blocks` blocks spread over `replicas` replicas, then times
`choose()` on fresh requests (hashing included) that share a prefix with indexed prompts.
Reports wall time and this thread's CPU time per decision: on a shared machine, CPU time leaves
out the time the process waits for a core, which wall time counts.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from app.lab.figures import percentile
from app.lab.workloads import _words
from app.routing import ReplicaStats, RequestView, make_policy


def measure(
    policy_name: str = "scored",
    replicas: int = 8,
    blocks: int = 100_000,
    prompt_tokens: int = 2000,
    decisions: int = 2000,
    seed: int = 0,
    block_size: int = 16,
) -> dict[str, float]:
    """Wall p50/p99/mean and CPU p50/p99 microseconds per decision, and the index size."""
    rng = random.Random(seed)
    policy = make_policy(policy_name, block_size=block_size, max_blocks=blocks // replicas)
    reps = [ReplicaStats(f"r{i}", in_flight=rng.randint(0, 8)) for i in range(replicas)]
    prefixes = [_words(rng, prompt_tokens // 2) for _ in range(64)]
    index = policy.index("m")
    turn = 0
    while index.size() < blocks * 0.99:
        text = rng.choice(prefixes) + _words(rng, prompt_tokens // 2)
        index.insert(
            reps[turn % replicas].replica_id, RequestView("m", text=text).block_hashes(block_size)
        )
        turn += 1
    texts = [rng.choice(prefixes) + _words(rng, prompt_tokens // 2) for _ in range(decisions)]
    times, cpu = [], []
    wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for text in texts:
        # The CPU clock is a system call (~1 us here): read it outside the wall-clock window.
        start_cpu = cpu_clock()
        start = wall_clock()
        policy.choose(RequestView("m", text=text), reps)
        end = wall_clock()
        cpu.append((cpu_clock() - start_cpu) / 1000)
        times.append((end - start) / 1000)
    return {
        "policy": policy_name,
        "replicas": replicas,
        "indexed_blocks": policy.index("m").size(),
        "prompt_tokens": prompt_tokens,
        "block_size": block_size,
        "p50_us": round(percentile(times, 50), 1),
        "p99_us": round(percentile(times, 99), 1),
        "mean_us": round(sum(times) / len(times), 1),
        "cpu_p50_us": round(percentile(cpu, 50), 1),
        "cpu_p99_us": round(percentile(cpu, 99), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default="scored", choices=["scored", "prefix"])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    a = parser.parse_args()
    args = (a.policy, a.replicas, a.blocks, a.prompt_tokens, a.decisions, 0, a.block_size)
    print(json.dumps(measure(*args)))


if __name__ == "__main__":
    main()
