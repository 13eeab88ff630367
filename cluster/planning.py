"""Which tier can hold a request, and in which chunks: the planning math `zit plan`, the ingress's routing and the
fleet simulator share (pure functions of the memory model; `cli/plan.py` prints them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.memory import Calibration, fits, largest_batch, largest_square, load_calibration, predict_peak
from cluster.profiles import Profile, default_profile
from cluster.tiers import GIB, NO_BF16_TIERS, tier_vram_bytes, vram_tiers


def default_tiers() -> dict[str, tuple[int, bool]]:
    """Every VRAM tier of the table in force at its nominal size; bf16 as its typical card (see NO_BF16_TIERS)."""
    return {name: (tier_vram_bytes(name), name not in NO_BF16_TIERS) for name in vram_tiers()}


def fleet_tiers(path: str | Path) -> dict[str, tuple[int, bool]]:
    """The tiers present in a fleet file, each planned for its weakest card (as the service runs them)."""
    from cluster.nvml import load_fleet  # lazily: the fleet module needs NVML bindings only here
    from cluster.tiers import tiers_for_cards

    return {t.name: (t.vram_bytes, t.bf16) for t in tiers_for_cards(load_fleet(path))}


def split_n(n: int, batch: int) -> list[int]:
    """n images in as few chunks of at most `batch` as possible, sizes as even as possible ([2, 2, 1] for 5 by 2)."""
    chunks = math.ceil(n / batch)
    base, extra = divmod(n, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


@dataclass(frozen=True)
class TierPlan:
    """How one tier would run a request: chunk sizes (empty when it cannot), or why not."""

    tier: str
    profile: Profile
    budget: int
    chunks: list[int]
    reason: str | None

    @property
    def fits(self) -> bool:
        return self.reason is None


def plan_tier(
    tier: str, profile: Profile, budget: int, width: int, height: int, n: int, steps: int,
    calibration: Calibration | None = None, cfg: bool = False,
) -> TierPlan:
    """Whether `tier` (its profile, its smallest card's `budget` bytes) takes n images of width x height, guided
    (classifier-free guidance doubles the transformer's batch) when `cfg`.

    Algorithm: the steps must be within the profile's limit; the largest batch that fits the budget at this size is
    the chunk size (auto batch size), and n is split into even chunks of at most that. When not even one image fits,
    `reason` is the memory model's, with the numbers. The ingress routes and `zit plan` reports with this function.
    """
    if steps > profile.max_steps:
        return TierPlan(tier, profile, budget, [],
                        f"steps={steps} is above profile {profile.name}'s max_steps {profile.max_steps}")
    batch = largest_batch(width, height, profile, budget, calibration, cfg)
    if batch == 0:
        return TierPlan(tier, profile, budget, [], fits(width, height, 1, profile, budget, calibration, cfg))
    return TierPlan(tier, profile, budget, split_n(n, batch), None)


def largest_request(profile: Profile, budget: int, width: int, height: int,
                    calibration: Calibration | None = None, cfg: bool = False) -> dict[str, int]:
    """The largest square side a tier takes at n=1, and the most images of width x height it takes per call (both
    guided when `cfg`)."""
    return {
        "side_at_n1": largest_square(profile, budget, 1, calibration, cfg),
        "n_at_size": largest_batch(width, height, profile, budget, calibration, cfg),
    }


def plan(
    width: int,
    height: int,
    n: int,
    steps: int = 9,
    tiers: dict[str, tuple[int, bool]] | None = None,
    calibration: Calibration | None = None,
    cfg: bool = False,
    profiles: dict[str, Profile] | None = None,
) -> list[dict]:
    """For each tier: whether n images of width x height fit, the predicted peak, the profile, the chunks.

    Each tier runs `profiles[tier]` when given (the service's profile, operator overrides applied: `service_tiers`),
    else its default profile for its bf16 support (see `plan_tier`); `cfg`: the request uses classifier-free
    guidance. The predicted peak is that of the largest chunk. `largest` gives the largest square side the tier
    accepts at n=1 and the most images of this size.
    """
    cal = calibration or load_calibration()
    rows = []
    for name, (budget, bf16) in (tiers or default_tiers()).items():
        profile = (profiles or {}).get(name) or default_profile(name, bf16)
        tier_plan = plan_tier(name, profile, budget, width, height, n, steps, cal, cfg)
        estimate = predict_peak(width, height, max(tier_plan.chunks, default=1), profile, cal, cfg)
        rows.append({
            "tier": name,
            "vram_gb": round(budget / GIB, 2),
            "bf16": bf16,
            "profile": profile.name,
            "technique": profile.technique(),
            "cfg": cfg,
            "largest": largest_request(profile, budget, width, height, cal, cfg),
            "fits": tier_plan.fits,
            "peak_gb": round(estimate.total / GIB, 2),
            "phase": estimate.phase,
            "terms": estimate.terms(),
            "chunks": tier_plan.chunks,
            "reason": tier_plan.reason,
            "text_encoder": profile.text_encoder,  # 'stage': the text-encoder stage encodes for this tier
        })
    return rows


# -- zit calibrate -------------------------------------------------------------------------------------------------


