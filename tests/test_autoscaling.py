"""The engine deployments' autoscaling policy counts the requests relayed to their ports."""

from __future__ import annotations

from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.config import load_config
from app.engines.autoscaling import POLICY, RELAYED, relay_aware_policy
from app.engines.llm_config import deployment_config


def _context(serve_counted: float, relayed: dict[str, float]) -> AutoscalingContext:
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=None,
        deployment_name="engine:m",
        app_name="vrstack",
        current_num_replicas=2,
        target_num_replicas=2,
        running_replicas=["a", "b"],
        total_num_requests=serve_counted,
        total_queued_requests=0,
        aggregated_metrics={RELAYED: relayed},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_relayed_requests_count_as_ongoing_requests():
    # 2 replicas, a target of 2 each: 8 relayed requests ask for 4 replicas
    assert relay_aware_policy(_context(0, {"a": 4, "b": 4}))[0] == 4
    assert relay_aware_policy(_context(4, {"a": 2, "b": 2}))[0] == 4  # both counts add up
    assert relay_aware_policy(_context(0, {"a": 1, "gone": 50}))[0] == 0.5  # running ones only


def test_autoscaled_engines_use_the_policy_and_fixed_ones_do_not():
    model = {"name": "m", "source": "org/m", "autoscaling": {"max_replicas": 3}}
    config = load_config({"models": [model, {"name": "n", "source": "org/n"}]})
    scaled, fixed = (deployment_config(spec, config.router) for spec in config.models)
    assert scaled["autoscaling_config"]["policy"] == {"policy_function": POLICY}
    assert scaled["autoscaling_config"]["max_replicas"] == 3
    assert "autoscaling_config" not in fixed and fixed["num_replicas"] == 1
