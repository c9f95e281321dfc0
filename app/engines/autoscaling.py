"""Replica autoscaling that counts the requests relayed to the engine replicas' own ports.

Serve's default policy scales a deployment on the requests Serve itself sees at its replicas
and handles. The stack's HTTP requests reach engine replicas on their own ports
(`app.engines.http_server`), out of Serve's sight, so each replica reports the ones it is
answering as a custom autoscaling metric (`RELAYED`, from `record_autoscaling_stats`), and
`relay_aware_policy` is Serve's default policy (target ongoing requests per replica; Serve still
applies the config's delays, factors and bounds around it) over Serve's own count plus those.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

POLICY = "app.engines.autoscaling:relay_aware_policy"
RELAYED = "relayed_requests"


def relayed(ctx: AutoscalingContext) -> float:
    """The requests the running replicas answer on their ports (averaged over the look-back)."""
    per_replica = (ctx.aggregated_metrics or {}).get(RELAYED, {})
    return float(sum(per_replica.get(replica, 0.0) for replica in ctx.running_replicas))


def relay_aware_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Serve's default policy, with the relayed requests counted as ongoing requests."""
    counted = AutoscalingContext(
        deployment_id=ctx.deployment_id,
        deployment_name=ctx.deployment_name,
        app_name=ctx.app_name,
        current_num_replicas=ctx.current_num_replicas,
        target_num_replicas=ctx.target_num_replicas,
        running_replicas=ctx.running_replicas,
        total_num_requests=ctx.total_num_requests + relayed(ctx),
        total_queued_requests=ctx.total_queued_requests,
        aggregated_metrics=ctx.aggregated_metrics,
        raw_metrics=ctx.raw_metrics,
        capacity_adjusted_min_replicas=ctx.capacity_adjusted_min_replicas,
        capacity_adjusted_max_replicas=ctx.capacity_adjusted_max_replicas,
        policy_state=ctx.policy_state,
        last_scale_up_time=ctx.last_scale_up_time,
        last_scale_down_time=ctx.last_scale_down_time,
        current_time=ctx.current_time,
        config=ctx.config,
    )
    return replica_queue_length_autoscaling_policy(counted)
