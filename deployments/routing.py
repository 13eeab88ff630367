"""Which tier takes a request, and how its n images are cut into chunks. Pure functions of their arguments.

A tier can take a request when its profile's limits allow the steps and the memory model predicts that one image
fits the tier's smallest card; its chunks are the most images one call fits there (auto batch size), split evenly
(`cluster.planning.plan_tier`, the same function `zit plan` reports with). A request with classifier-free guidance
(`cfg`: guidance_scale > 0) is planned as guided everywhere: its images cost the transformer twice the activations, so
fewer fit per call and fewer tiers hold it. The CPU tier has no card: only its profile's limits apply.
"""

from __future__ import annotations

from cluster.memory import Calibration
from cluster.planning import TierPlan, largest_request, plan_tier
from cluster.profiles import Profile
from cluster.tiers import TierConfig, tier_budget


class NoTierFits(ValueError):
    """No tier accepts the request; `reasons` says why for each, `largest` what each accepts at most."""

    def __init__(self, width: int, height: int, steps: int, reasons: dict[str, str], largest: dict[str, dict],
                 cfg: bool = False):
        self.reasons = reasons
        self.largest = largest
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        guided = " and classifier-free guidance (guidance_scale > 0; 0 needs less memory)" if cfg else ""
        super().__init__(f"no tier can generate {width}x{height} with {steps} steps{guided} ({detail})")


def tier_plans(
    tiers: list[TierConfig], profiles: dict[str, Profile], width: int, height: int, steps: int, n: int,
    calibration: Calibration | None = None, budgets: dict[str, int] | None = None, cfg: bool = False,
) -> list[TierPlan]:
    """Every tier's plan for the request (guided when `cfg`), in configured order (cheapest first).

    `budgets` overrides a tier's memory budget (the live one: less when other processes hold memory on its cards).
    """
    plans = []
    for tier in tiers:
        profile = profiles[tier.name]
        budget = (budgets or {}).get(tier.name, tier_budget(tier))
        if tier.num_replicas == 0:
            plans.append(TierPlan(tier.name, profile, budget, [], "tier has no replicas"))
        else:
            plans.append(plan_tier(tier.name, profile, budget, width, height, n, steps, calibration, cfg))
    return plans


def no_tier_fits(plans: list[TierPlan], width: int, height: int, steps: int,
                 calibration: Calibration | None = None, cfg: bool = False) -> NoTierFits:
    """The error for a request no tier takes: every tier's reason and the largest request it accepts (guided, when
    the request is)."""
    largest = {
        p.tier: {**largest_request(p.profile, p.budget, width, height, calibration, cfg),
                 "max_steps": p.profile.max_steps}
        for p in plans
    }
    return NoTierFits(width, height, steps, {p.tier: p.reason for p in plans}, largest, cfg)


def fitting_plans(
    tiers: list[TierConfig], profiles: dict[str, Profile], width: int, height: int, steps: int, n: int = 1,
    calibration: Calibration | None = None, budgets: dict[str, int] | None = None,
    unavailable: dict[str, str] | None = None, cfg: bool = False,
) -> list[TierPlan]:
    """The tiers that take the request (guided when `cfg`), in configured order (cheapest first), with their chunks.

    `unavailable` names tiers that cannot take anything now, with the reason (a drained tier). Raises NoTierFits
    with every tier's reason and the largest request each accepts when none takes it.
    """
    plans = tier_plans(tiers, profiles, width, height, steps, n, calibration, budgets, cfg)
    plans = [TierPlan(p.tier, p.profile, p.budget, [], (unavailable or {})[p.tier])
             if p.tier in (unavailable or {}) else p for p in plans]
    fitting = [p for p in plans if p.fits]
    if not fitting:
        raise no_tier_fits(plans, width, height, steps, calibration, cfg)
    return fitting


def choose_tier(
    tiers: list[TierConfig], profiles: dict[str, Profile], width: int, height: int, steps: int, n: int = 1,
    calibration: Calibration | None = None, cfg: bool = False,
) -> TierPlan:
    """The first tier, in configured order (cheapest first), that takes the request (NoTierFits if none)."""
    return fitting_plans(tiers, profiles, width, height, steps, n, calibration, cfg=cfg)[0]
