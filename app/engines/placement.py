"""What a stack asks Ray for, and whether a Ray cluster's nodes can hold it.

A replica's placement group (`llm_config.placement_bundles`) starts only when each of its bundles
fits in what some node has left; until then Ray waits (its autoscaler logs a request it cannot
place, without naming the model). `shortfalls` says at once, from the nodes' totals, what can
never fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from app.config import ModelSpec, StackConfig
from app.engines.llm_config import placement_bundles

Resources = dict[str, float]
SHOWN = ("GPU", "CPU", "memory")  # first, in this order; then any custom resource asked for
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Demand:
    """One deployment's needs: the bundles of one replica, and the replicas it starts with."""

    name: str
    bundles: list[Resources]
    replicas: int

    @property
    def per_replica(self) -> Resources:
        return total(self.bundles)

    def describe(self) -> str:
        """E.g. 'facebook/opt-125m needs GPU 1, CPU 6, memory 16Gi per replica x 1 replica'."""
        gpus = sum(1 for b in self.bundles if b.get("GPU"))
        split = f" ({gpus} bundles of one GPU)" if gpus > 1 else ""
        plural = "" if self.replicas == 1 else "s"
        return (
            f"{self.name} needs {describe(self.per_replica)} per replica{split} "
            f"x {self.replicas} replica{plural}"
        )


def start_replicas(spec: ModelSpec) -> int:
    """Replicas Ray Serve starts the model with (autoscaling starts at its minimum)."""
    return spec.replicas if spec.autoscaling is None else spec.autoscaling.min_replicas


def model_demand(spec: ModelSpec) -> Demand:
    """The model's engine: its placement bundles as Ray Serve LLM requests them, which adds
    `accelerator_type:<type>` (0.001) to each with an accelerator type (`VLLMEngineConfig.
    placement_bundles`); Ray gives that resource to nodes with that accelerator."""
    bundles = placement_bundles(spec)
    if accelerator := spec.resources.accelerator_type:
        bundles = [{**bundle, f"accelerator_type:{accelerator}": 0.001} for bundle in bundles]
    return Demand(spec.name, bundles, start_replicas(spec))


def stack_demands(config: StackConfig) -> list[Demand]:
    """Each model's engine, then the ingress (as `app.builder` deploys them)."""
    server = config.server
    ingress = {"CPU": server.ingress_cpus, **server.ingress_resources}
    return [model_demand(spec) for spec in config.models] + [
        Demand("the ingress", [ingress], server.ingress_replicas)
    ]


def total(bundles: Iterable[Resources]) -> Resources:
    summed: Resources = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            summed[key] = summed.get(key, 0.0) + amount
    return summed


def fits(bundle: Resources, node: Resources) -> bool:
    """Whether a node with these totals can hold the bundle (Ray's rule: every resource)."""
    return all(amount <= node.get(key, 0.0) for key, amount in bundle.items() if amount > 0)


def _amount(key: str, amount: float) -> str:
    if key == "memory":
        return f"{amount / 2**30:.3g}Gi"
    return f"{amount:g}"


def describe(resources: Resources) -> str:
    """'GPU 1, CPU 6, memory 16Gi': the resources Ray schedules on, zeros left out."""
    keys = [k for k in SHOWN if resources.get(k)] + sorted(
        k for k in resources if k not in SHOWN and resources[k] and _custom(k)
    )
    return ", ".join(_one(k, resources[k]) for k in keys) or "nothing"


def _one(key: str, amount: float) -> str:
    # Ray's accelerator marker: what counts is the type in its name, not the 0.001.
    return key if key.startswith("accelerator_type:") else f"{key} {_amount(key, amount)}"


def _custom(key: str) -> bool:
    # Ray's own bookkeeping resources: not something a user asks for or needs to see.
    return not key.startswith("node:") and key != "object_store_memory"


def describe_cluster(nodes: list[Resources]) -> str:
    """E.g. '1 node: CPU 8, memory 11.2Gi (no GPU)'."""
    summed = total(nodes)
    plural = "" if len(nodes) == 1 else "s"
    no_gpu = "" if summed.get("GPU") else " (no GPU)"
    return f"{len(nodes)} node{plural}: {describe(summed)}{no_gpu}"


@dataclass(frozen=True)
class Shortfall:
    """Something that can never start, and the resources it lacks."""

    reason: str
    resources: list[str]


def _most(nodes: list[Resources], key: str) -> float:
    """The most of a resource one node has."""
    return max((node.get(key, 0.0) for node in nodes), default=0.0)


def unplaceable(demand: Demand, nodes: list[Resources]) -> Shortfall | None:
    """Why no replica of `demand` can ever start on these nodes (their totals), or None."""
    for bundle in demand.bundles:
        if any(fits(bundle, node) for node in nodes):
            continue
        if keys := [k for k, amount in bundle.items() if amount > _most(nodes, k)]:
            most = ", ".join(
                f"{k} {_amount(k, bundle[k])} (most on a node: {_amount(k, _most(nodes, k))})"
                for k in keys
            )
            return Shortfall(f"no node has {most}", keys)
        return Shortfall(f"no single node has all of {describe(bundle)}", list(bundle))
    return None


def shortfalls(demands: list[Demand], nodes: list[Resources]) -> list[Shortfall]:
    """What can never start on these nodes (their total resources): each demand whose bundle
    fits no node; failing that, the resources the stack needs more of than all nodes have."""
    found = [
        Shortfall(f"{demand.describe()}: {short.reason}", short.resources)
        for demand in demands
        if (short := unplaceable(demand, nodes)) is not None
    ]
    if found:
        return found
    needed = total(b for d in demands for _ in range(d.replicas) for b in d.bundles)
    have = total(nodes)
    if keys := [k for k, amount in needed.items() if amount > have.get(k, 0.0)]:
        reason = f"together the stack needs {describe(needed)}; the cluster has {describe(have)}"
        return [Shortfall(reason, keys)]
    return []


def cluster_nodes() -> list[Resources]:
    """The total resources of each alive node of the Ray cluster this process is connected to."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def warn_if_unplaceable(spec: ModelSpec) -> str | None:
    """Log (and return) one warning line when no node of the connected Ray cluster can hold a
    bundle of the model's replica: it would wait in silence. Only a warning, as a node that
    fits may still join (an autoscaler adds nodes on demand)."""
    import ray

    if not ray.is_initialized():
        return None
    nodes = cluster_nodes()
    demand = model_demand(spec)
    short = unplaceable(demand, nodes)
    if short is None:
        return None
    line = (
        f"vrstack: {demand.describe()}, but {short.reason} in this Ray cluster "
        f"({describe_cluster(nodes)}); its replicas wait until such a node joins "
        "(an autoscaler may add one; `ray status` shows the pending demand)"
    )
    logger.warning(line)
    return line
