"""The Ray Serve adapter of the autoscaling policy (autoscaling/serve_policy.py) on Serve's own AutoscalingContext,
and the deployment options it produces (resolved by Serve's own policy loader)."""

from pathlib import Path

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.serve_policy import FleetAutoscaler, TierAutoscaler
from deployments.config import COLD_START_OVERHEAD_S, AutoscalingSettings

DEPLOYMENT = DeploymentID(name="Generator_vram_12", app_name="zit")
ROOT = Path(__file__).resolve().parents[3]
FAST = AutoscalingSettings(idle_timeout_s=30, downscale_delay_s=10, cold_start_s=5, target_wait_s=10)


def context(now, replicas=0, cards=3, requests=0.0, at_handles=0.0, state=None, target=None, deployment=DEPLOYMENT,
            config=None, **per_replica):
    """A context as Serve builds it (`replicas` running, `target` asked for); per_replica: metric -> list of values,
    one per running replica."""
    ids = [ReplicaID(f"r{i}", deployment) for i in range(replicas)]
    metrics = {name: dict(zip(ids, values)) for name, values in per_replica.items()}
    return AutoscalingContext(
        deployment_id=deployment, deployment_name=deployment.name, app_name="zit", current_num_replicas=replicas,
        target_num_replicas=replicas if target is None else target, running_replicas=ids, total_num_requests=requests,
        total_queued_requests=at_handles, aggregated_metrics=metrics, raw_metrics=None,
        capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=cards, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


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


# -- the application-level policy (FleetAutoscaler) -------------------------------------------------------------

SMALL, LARGE = DeploymentID(name="Generator_vram_6", app_name="zit"), DeploymentID(name="Generator_vram_12", app_name="zit")
INGRESS = DeploymentID(name="Ingress", app_name="zit")


def tier_config(tier, cards, vram_gb, prior):
    return AutoscalingConfig(**FAST.serve_autoscaling_config(tier, cards, prior, vram_gb << 30))


def fleet_policy():
    """The application-level policy exactly as Serve loads it from serve_config.yaml (schema, loader, wrapper)."""
    import yaml
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
    from ray.serve.config import AutoscalingPolicy
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    policy = AutoscalingPolicy(**config.applications[0].autoscaling_policy)
    resolved = _resolve_policy_callable(policy)
    assert isinstance(resolved, FleetAutoscaler)
    return _apply_app_level_autoscaling_config(resolved)


def test_serve_config_names_the_application_level_policy():
    policy = fleet_policy()
    assert policy({}) == ({}, {})  # an application without autoscaled tiers: nothing to decide


def test_a_saturated_small_tier_raises_a_larger_tier_in_the_same_decision():
    """vram_6 (1 card) has a queue its card cannot clear; vram_12 (3 cards) is idle at one replica. Alone, vram_12's
    own policy keeps it where it is; the application-level policy raises it for vram_6's excess."""
    small = dict(replicas=1, cards=1, requests=1, busy_fraction=[1.0], units_per_s=[2000.0], queued=[10],
                 queued_units=[10 * 40000.0], load_s=[3.0], deployment=SMALL, config=tier_config("vram_6", 1, 6, 2000.0))
    large = dict(replicas=1, cards=3, busy_fraction=[0.0], units_per_s=[6000.0], load_s=[3.0], deployment=LARGE,
                 config=tier_config("vram_12", 3, 12, 6000.0))
    alone, alone_state = TierAutoscaler(**large["config"].policy.policy_kwargs)(context(1000.0, **large))
    assert alone == 1 and alone_state["signal"] in ("steady", "hold")
    decisions, states = fleet_policy()({SMALL: context(1000.0, **small), LARGE: context(1000.0, **large)})
    assert decisions[SMALL] == 1 and states[SMALL]["saturated"] and "vram_12" in states[SMALL]["spill_up"]
    assert decisions[LARGE] > 1 and states[LARGE]["signal"] == "spill_up_from_vram_6", states[LARGE]


def test_a_warm_larger_tier_covers_a_tier_that_is_still_loading():
    """vram_6 has no replica ready and 8 chunks waiting (its first replica takes a cold start); the warm vram_12,
    lightly loaded and so not scaling for itself, is raised to take that work meanwhile."""
    cfg6, cfg12 = tier_config("vram_6", 2, 6, 2000.0), tier_config("vram_12", 2, 12, 6000.0)
    large = dict(replicas=1, cards=2, busy_fraction=[0.3], units_per_s=[6000.0], deployment=LARGE, config=cfg12)
    alone, _ = TierAutoscaler(**cfg12.policy.policy_kwargs)(context(1000.0, **large))
    assert alone == 1
    decisions, states = fleet_policy()({
        SMALL: context(1000.0, replicas=0, cards=2, requests=8, at_handles=8, deployment=SMALL, config=cfg6),
        LARGE: context(1000.0, **large)})
    assert decisions[SMALL] >= 1 and states[SMALL]["send_to"] == "vram_12"
    assert decisions[LARGE] == 2 and states[LARGE]["signal"] == "cold_start_cover"
    assert states[LARGE]["takes_from"] == ["vram_6"]


def test_replicas_on_cards_nvml_lost_are_neither_capacity_nor_stopped_in_place_of_healthy_ones():
    """Three cards, one lost, demand for more than two: the policy sizes from the two healthy cards (it cannot scale
    up onto the lost one) and returns the lost card's replica on top, so Serve stops nothing healthy."""
    cfg = tier_config("vram_12", 3, 12, 6000.0)
    busy = context(1000.0, replicas=3, cards=3, busy_fraction=[1.0, 0.0, 1.0], units_per_s=[6000.0] * 3,
                   card_unusable=[0.0, 1.0, 0.0], queued=[9] * 3, queued_units=[9 * 40000.0] * 3, deployment=LARGE,
                   config=cfg)
    decisions, states = fleet_policy()({LARGE: busy})
    assert decisions[LARGE] == 3 and states[LARGE]["unusable_cards"] == 1
    assert states[LARGE]["busy"] == 1.0  # the lost card's idle replica is not in the average
    assert states[LARGE]["replicas"] == "2 -> 2" and states[LARGE]["saturated"]  # capped at the healthy cards
    # Without the lost card the same demand would keep all three.
    healthy = context(1000.0, replicas=3, cards=3, busy_fraction=[1.0, 0.0, 1.0], units_per_s=[6000.0] * 3,
                      queued=[9] * 3, queued_units=[9 * 40000.0] * 3, deployment=LARGE, config=cfg)
    decisions, states = fleet_policy()({LARGE: healthy})
    assert decisions[LARGE] == 3 and states[LARGE]["replicas"] == "3 -> 3" and "unusable_cards" not in states[LARGE]


def test_deployments_that_are_not_tiers_are_left_to_serve():
    cfg = tier_config("vram_12", 3, 12, 6000.0)
    plain = AutoscalingConfig(min_replicas=1, max_replicas=2)
    decisions, states = fleet_policy()({LARGE: context(1000.0, replicas=1, busy_fraction=[0.0], deployment=LARGE,
                                                       config=cfg),
                                        INGRESS: context(1000.0, replicas=1, cards=2, deployment=INGRESS,
                                                         config=plain)})
    assert set(decisions) == {LARGE}  # Serve keeps the ingress where it is
    assert "signal" in states[LARGE] and "signal" not in states[INGRESS]


def test_the_ingress_grows_with_the_requests_it_holds_and_shrinks_only_after_the_delay():
    """Autoscaled (ingress_max_replicas above ingress_replicas), the ingress gets one replica per
    `ingress_target_requests` held, in the application-level policy's same call as the tiers; back down only once
    the need has stayed lower for downscale_delay_s."""
    settings = AutoscalingSettings(ingress_target_requests=50, downscale_delay_s=10)
    cfg = AutoscalingConfig(**settings.ingress_autoscaling_config(2, 4))
    assert (cfg.min_replicas, cfg.max_replicas, cfg.initial_replicas) == (2, 4, 2)
    tier = tier_config("vram_12", 3, 12, 6000.0)
    busy = context(1000.0, replicas=2, cards=4, requests=180, deployment=INGRESS, config=cfg)
    decisions, states = fleet_policy()({INGRESS: busy, LARGE: context(1000.0, replicas=1, busy_fraction=[0.0],
                                                                      deployment=LARGE, config=tier)})
    assert decisions[INGRESS] == 4 and states[INGRESS]["signal"] == "ingress"  # 180 held / 50 each
    state, now = states[INGRESS], 1001.0
    while now < 1030:
        decisions, states = fleet_policy()({INGRESS: context(now, replicas=4, cards=4, requests=10, state=state,
                                                             deployment=INGRESS, config=cfg)})
        state = states[INGRESS]
        if decisions[INGRESS] < 4:
            break
        now += 1
    assert decisions[INGRESS] == 1 and 1010 <= now <= 1012  # Serve then keeps it at min_replicas (2)
