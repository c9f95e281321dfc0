"""What `vrstack k8s render` takes besides the serve config: names, images, upgrades, extras."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# KubeRay's RayService upgrade strategies (docs/kubernetes.md, "Upgrade strategies").
UpgradeStrategy = Literal["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]
UPGRADE_STRATEGIES: tuple[UpgradeStrategy, ...] = get_args(UpgradeStrategy)
INCREMENTAL_UPGRADE: UpgradeStrategy = "NewClusterWithIncrementalUpgrade"
UPGRADE_INTERVAL_S = 60  # Ray's recommended intervalSeconds for incremental upgrades


@dataclass(frozen=True)
class ClusterUpgradeOptions:
    """NewClusterWithIncrementalUpgrade's settings (spec.upgradeStrategy.clusterUpgradeOptions)."""

    gateway_class_name: str | None = None  # a GatewayClass of the cluster (required)
    max_surge_percent: int | None = None  # default: one pod of the largest group per step
    step_size_percent: int | None = None  # default: the max surge
    interval_seconds: int = UPGRADE_INTERVAL_S


@dataclass(frozen=True)
class RenderOptions:
    """Choices that are not in the serve config."""

    name: str
    image: str | None = None  # an image with this package (ours); default: Ray's + runtime_env
    working_dir: str | None = None  # remote zip URI of this project (runtime_env working_dir)
    package: str | None = None  # pip requirement of this package (default: the ConfigMap's)
    upgrade_strategy: UpgradeStrategy = "NewCluster"
    cluster_upgrade: ClusterUpgradeOptions = ClusterUpgradeOptions()  # incremental upgrades only
    hf_token_secret: str = "hf-token"
    hf_token_key: str = "token"
    pod_monitor: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None  # the model-cache claim's; default: the cluster's default
