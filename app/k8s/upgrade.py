"""How a RayService is upgraded: KubeRay's strategies as `spec.upgradeStrategy`."""

from __future__ import annotations

from typing import Any

from app.k8s.options import INCREMENTAL_UPGRADE, RenderOptions


def upgrade_strategy_spec(options: RenderOptions, cluster: dict[str, Any]) -> dict[str, Any]:
    """spec.upgradeStrategy. NewClusterWithIncrementalUpgrade (the new cluster grows by
    maxSurgePercent of Serve's capacity at a time while a Gateway moves traffic over) also gets
    its clusterUpgradeOptions, and needs Ray autoscaling and a GatewayClass (else ValueError)."""
    if options.upgrade_strategy != INCREMENTAL_UPGRADE:
        return {"type": options.upgrade_strategy}
    if cluster.get("enableInTreeAutoscaling") is not True:
        raise ValueError(
            f"{INCREMENTAL_UPGRADE} needs Ray autoscaling, and no model of this serve config "
            "autoscales: give a model an `autoscaling` section (min_replicas, max_replicas), or "
            "render with --upgrade-strategy NewCluster (room for a second cluster) or None"
        )
    upgrade = options.cluster_upgrade
    if not upgrade.gateway_class_name:
        raise ValueError(
            f"{INCREMENTAL_UPGRADE} moves traffic through a Gateway API Gateway: pass "
            "--gateway-class NAME, a GatewayClass of your cluster (`kubectl get gatewayclass`; "
            "e.g. istio)"
        )
    largest = max((int(g["maxReplicas"]) for g in cluster["workerGroupSpecs"]), default=1)
    # Ray's guidance: grow by one pod at a time (the largest group's; at most one per group)
    surge = upgrade.max_surge_percent
    surge = max(1, 100 // max(largest, 1)) if surge is None else surge
    step = surge if upgrade.step_size_percent is None else upgrade.step_size_percent
    return {
        "type": INCREMENTAL_UPGRADE,
        "clusterUpgradeOptions": {
            "gatewayClassName": upgrade.gateway_class_name,
            "maxSurgePercent": surge,
            "stepSizePercent": step,
            "intervalSeconds": upgrade.interval_seconds,
        },
    }


def incremental_cluster(cluster: dict[str, Any]) -> dict[str, Any]:
    """`cluster` for incremental upgrades: every worker group starts at 0 pods and the Ray
    autoscaler adds the pods Serve's replicas need. KubeRay starts a new cluster's groups at
    minReplicas, then raises Serve's target capacity step by step; a minimum of min_replicas
    would start those pods (and take their GPUs) before the first step."""
    workers = [{**group, "replicas": 0, "minReplicas": 0} for group in cluster["workerGroupSpecs"]]
    return {**cluster, "workerGroupSpecs": workers}
