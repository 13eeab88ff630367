"""The Ray Serve adapter of the autoscaling policy (autoscaling/serve_policy.py) on Serve's own AutoscalingContext,
and the deployment options it produces (resolved by Serve's own policy loader)."""

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.serve_policy import COLD_START_OVERHEAD_S, AutoscalingSettings, TierAutoscaler

DEPLOYMENT = DeploymentID(name="Generator_vram_12", app_name="zit")
FAST = AutoscalingSettings(idle_timeout_s=30, downscale_delay_s=10, cold_start_s=5, target_wait_s=10)


def context(now, replicas=0, cards=3, requests=0.0, at_handles=0.0, state=None, target=None, **per_replica):
    """A context as Serve builds it (`replicas` running, `target` asked for); per_replica: metric -> list of values,
    one per running replica."""
    ids = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(replicas)]
    metrics = {name: dict(zip(ids, values)) for name, values in per_replica.items()}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name="zit", current_num_replicas=replicas,
        target_num_replicas=replicas if target is None else target, running_replicas=ids, total_num_requests=requests,
        total_queued_requests=at_handles, aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=cards, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None)


def test_a_wake_up_at_a_tier_with_no_replica_starts_one():
    policy = TierAutoscaler("vram_12", FAST.model_dump())
    replicas, state = policy(context(1000.0, replicas=0, requests=1, at_handles=1))
    assert 1 <= replicas <= 3 and state["signal"] == "scale_from_zero" and state["queue"] == 1


def test_busy_replicas_with_a_queue_scale_up_within_the_cards():
    policy = TierAutoscaler("vram_12", FAST.model_dump())
    replicas, state = policy(context(1000.0, replicas=1, requests=1, busy_fraction=[1.0], units_per_s=[5000.0],
                                     queued=[6], queued_units=[6 * 50000.0], load_s=[3.0]))
    assert replicas == 3 and state["signal"] == "scale_up"  # the need is above the 3 cards: capped there
    assert state["measured"] is True and state["_cold_start_s"] == 3.0 + COLD_START_OVERHEAD_S


def test_an_idle_tier_holds_then_goes_to_zero_after_the_idle_timeout():
    policy = TierAutoscaler("vram_12", FAST.model_dump())
    now, state, replicas = 1000.0, {}, 2
    signals = []
    while now < 1100 and replicas:
        replicas, state = policy(context(now, replicas=replicas, state=state, busy_fraction=[0.0] * replicas))
        signals.append((now - 1000, replicas, state["signal"]))
        now += 5
    assert replicas == 0
    first_zero = next(t for t, n, _ in signals if n == 0)
    assert FAST.idle_timeout_s <= first_zero <= FAST.idle_timeout_s + 5
    assert signals[-1][2] == "scale_to_zero"
    assert all(n >= 1 for t, n, _ in signals if t < FAST.idle_timeout_s)  # never to zero while recently busy


def test_serve_loads_the_policy_class_from_the_deployment_options():
    config = AutoscalingConfig(**FAST.serve_autoscaling_config("vram_12", cards=3, prior_units_per_s=4000.0))
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    policy = _resolve_policy_callable(config.policy)
    assert isinstance(policy, TierAutoscaler) and policy.tier == "vram_12"
    assert policy.config.prior("vram_12") == 4000.0 and policy.config.idle_timeout_s == 30
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (0, 3, 3)
    assert AutoscalingConfig(**AutoscalingSettings(initial_replicas=0).serve_autoscaling_config("vram_4", 2)) \
        .initial_replicas == 0


def test_unknown_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="idle_timeout"):
        AutoscalingSettings(idle_timeout=5)


def test_replicas_still_starting_are_not_cancelled_by_a_quiet_moment():
    """Serve counts only running replicas as current; the policy must size from the target, or it would stop the
    replicas it just asked for as soon as the queue empties."""
    policy = TierAutoscaler("vram_12", FAST.model_dump())
    replicas, state = policy(context(1000.0, replicas=1, target=3, busy_fraction=[0.2]))
    assert replicas == 3 and state["signal"] in ("hold", "steady")
