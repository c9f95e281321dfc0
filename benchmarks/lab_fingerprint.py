"""Every decision of the lab's reference replays, digested: `python -m benchmarks.lab_fingerprint`.

Replays 60 configurations (3 workloads x 4/8 replicas x 2048/200 cache blocks x 5 policies,
seed 0) and digests each decision's replica and reason. Prints one line per replay
(`workload/replicas/blocks/policy digest`) and a `TOTAL` line over them all: an unchanged TOTAL
means unchanged routing, e.g. across a refactor of `app.routing`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from app.lab.run import lab_policy
from app.lab.simulator import SimSettings, replay
from app.lab.workloads import WORKLOADS

POLICIES = ("round_robin", "power_of_two", "session", "prefix", "scored")
REPLICAS = (4, 8)
CACHE_BLOCKS = (2048, 200)


def replay_digests() -> Iterator[tuple[str, str]]:
    """(`workload/replicas/blocks/policy`, 16-hex digest of its decisions) for each replay."""
    for workload, generate in WORKLOADS.items():
        requests = generate(seed=0)
        for replicas in REPLICAS:
            for blocks in CACHE_BLOCKS:
                settings = SimSettings(cache_blocks=blocks)
                for policy in POLICIES:
                    result = replay(requests, lab_policy(policy, settings, 0), replicas, settings)
                    lines = "\n".join(f"{d.replica_id} {d.reason}" for d in result.decisions)
                    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
                    yield f"{workload}/{replicas}/{blocks}/{policy}", digest


def main() -> None:
    total = hashlib.sha256()
    for name, digest in replay_digests():
        print(name, digest, flush=True)
        total.update(digest.encode())
    print("TOTAL", total.hexdigest())


if __name__ == "__main__":
    main()
