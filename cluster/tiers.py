"""Tiers: classes of cards that share one Generator deployment and one set of limits.

A tier is what the router chooses between. Cards are classified into VRAM tiers by the total memory NVML reports
(`classify`); with no card at all the service runs one CPU tier (the embedded default).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The largest image side any tier accepts. 2048 is where the seed article stops (tiled VAE makes it possible) and
# what the memory tables cover; a larger side needs a new calibration, not just a bigger number here.
MAX_IMAGE_SIDE = 2048
# The smallest: what admission accepts, and the request the memory model's floor is computed from.
MIN_IMAGE_SIDE = 64

GIB = 1 << 30

# The shipped VRAM tiers by nominal size in GiB (what the box says: a "12 GB" RTX 3060 has 12288 MiB). A card belongs
# to the largest tier whose nominal size it reaches, so a 10 GB RTX 3080 serves as an 8 GB card and a 32 GB RTX 5090
# as a 24 GB one. These are the tiers cluster/profiles.py ships a profile for; the table in force is `vram_tiers()`.
VRAM_TIERS_GIB: dict[str, float] = {
    "vram_4": 4,
    "vram_6": 6,
    "vram_8": 8,
    "vram_12": 12,
    "vram_16": 16,
    "vram_24": 24,
}
# The tier table in force, as whole-GB lower bounds ("4,6,8,10,12,16,24,32"; tier names vram_<GB>). Unset: the
# shipped table above. Every zit process of one cluster (`zit up`, `zit node`, the Ray processes they start, which
# inherit it) must see the same value; `--tiers` on zit up/node/fleet/plan sets it.
ZIT_VRAM_TIERS_GB_ENV = "ZIT_VRAM_TIERS_GB"
# Tiers whose typical cards lack bf16 (the 4 GB GTX 1650 and the 6 GB GTX 1660 Super / RTX 2060 are compute
# capability 7.5). From 8 GB on, the common cards (RTX 3060/3070/3080/3090/40xx) have bf16; an 8 GB RTX 2070 Super
# does not, and a fleet file says so per card. Planning without cards (`zit plan`, priors) assumes these.
NO_BF16_TIERS = ("vram_4", "vram_6")
# NVML reports total memory a little under the nominal size (driver-reserved memory: a 4 GB GTX 1650 shows about
# 3.8 GiB with recent drivers), so a card reaches a tier at 90 % of its nominal size.
CLASSIFY_MARGIN = 0.10
# Bounds of a configured tier, GB: nothing smaller holds the model's smallest request; 1024 is far above any card.
MIN_TIER_GB, MAX_TIER_GB = 1, 1024


def parse_vram_tiers(spec: str, source: str = ZIT_VRAM_TIERS_GB_ENV) -> dict[str, float]:
    """A tier table from comma-separated whole-GB lower bounds ("4,8,12,24" -> vram_4, vram_8, ...), smallest first.

    Raises ValueError naming `source` (the variable or option it came from) when an entry is not a whole number
    from MIN_TIER_GB to MAX_TIER_GB, when one repeats, or when the list is empty.
    """
    sizes: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit() or not MIN_TIER_GB <= int(part) <= MAX_TIER_GB:
            raise ValueError(f"{source}={spec!r}: {part!r} is not a whole number of GB from {MIN_TIER_GB} to "
                             f"{MAX_TIER_GB}; write the tiers' lower bounds, e.g. '4,6,8,12,16,24'")
        if int(part) in sizes:
            raise ValueError(f"{source}={spec!r}: {part} GB is listed twice; give each tier once")
        sizes.append(int(part))
    return {f"vram_{gb}": float(gb) for gb in sorted(sizes)}


def vram_tiers() -> dict[str, float]:
    """The tier table in force: $ZIT_VRAM_TIERS_GB when set (ValueError naming it when malformed), else the shipped
    VRAM_TIERS_GIB. Read at each call, so `--tiers` (which sets the variable) applies to everything after it."""
    spec = os.environ.get(ZIT_VRAM_TIERS_GB_ENV, "").strip()
    return parse_vram_tiers(spec) if spec else dict(VRAM_TIERS_GIB)


def tier_gib(tier: str) -> float:
    """Nominal size of a VRAM tier in GiB: from the table in force, else the shipped one (a shipped tier's name is
    its size whichever table is configured). KeyError naming both tables for any other name."""
    table = vram_tiers()
    if tier in table:
        return table[tier]
    if tier in VRAM_TIERS_GIB:
        return VRAM_TIERS_GIB[tier]
    raise KeyError(f"unknown tier {tier!r}; tiers in force: {', '.join(table)} (set by {ZIT_VRAM_TIERS_GB_ENV})")


def classify(total_bytes: int, tiers: dict[str, float] | None = None, margin: float = CLASSIFY_MARGIN) -> str | None:
    """The tier of a card with `total_bytes` of memory (from `tiers`, default the table in force), or None when it
    is below the smallest tier."""
    table = vram_tiers() if tiers is None else tiers
    fitting = [(gib, name) for name, gib in table.items() if total_bytes >= gib * GIB * (1 - margin)]
    return max(fitting)[1] if fitting else None


def tier_vram_bytes(tier: str) -> int:
    """Nominal memory of a VRAM tier (the smallest card that belongs to it)."""
    return int(tier_gib(tier) * GIB)


class TierConfig(BaseModel):
    """One tier: the cards it runs on and the Ray options of its Generator deployment.

    What a tier's replicas can hold (limits, memory techniques) is its *profile* (cluster/profiles.py): the tier's
    default profile with `profile` overrides applied.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,31}$",
        description="Tier name, used in deployment names, metrics labels and Ray resources (e.g. 'cpu', 'vram_12').",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the pipeline runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype (the profile's compute_dtype; `profile: {compute_dtype: ...}` wins); 'auto' "
        "is the tier profile's: float32 on CPU and on cards without bf16, bfloat16 on cards with it. Cards without "
        "bf16 refuse anything but float32.",
    )
    num_replicas: int = Field(1, ge=0, description="Generator replicas of this tier (one per card on GPU tiers).")
    max_ongoing_requests: int = Field(
        2, ge=1, description="Requests a replica holds at once; one runs, the rest wait for its pipeline lock."
    )
    max_queued_requests: int = Field(
        32, ge=1, description="Requests waiting for a replica of this tier; beyond it the service answers 503."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    num_gpus: float = Field(0.0, ge=0, le=1, description="GPUs Ray reserves for each replica (1 on a card tier).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources a replica needs, e.g. {'vram_12': 1} to pin a tier."
    )
    bf16: bool = Field(False, description="Every card of this tier supports bf16 (decides the compute dtype).")
    speed: float | None = Field(
        None, gt=0, description="Relative speed of the tier's slowest card (RTX 4090 = 1); None when unknown."
    )
    vram_bytes: int | None = Field(
        None, gt=0, description="Memory of the tier's smallest card as NVML reports it; None on the CPU tier."
    )
    link_bytes_s: float | None = Field(
        None, gt=0, description="Host-to-device copy rate of the tier's slowest card link (cluster/link.py), bytes "
        "per second; None when no card's link is known (the time model's default rate)."
    )
    link_detail: str = Field("", description="That link, e.g. 'gen3 x1'.")
    link_aware: bool = Field(
        True, description="Replicas rank by their own card's link and the time model takes the tier's; false: every "
        "card at the default rate (the service's `link_aware: false`)."
    )
    profile: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the tier profile's knobs (cluster/profiles.py), e.g. {'max_n': 2, 'vae_tiling': true}.",
    )

    @model_validator(mode="after")
    def _device_matches_gpus(self) -> "TierConfig":
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError(f"tier {self.name!r}: device='cuda' needs num_gpus > 0 (got num_gpus={self.num_gpus})")
        if self.device == "cpu" and self.num_gpus > 0:
            raise ValueError(f"tier {self.name!r}: device='cpu' with num_gpus={self.num_gpus}; use device='cuda'")
        return self


# A budget no request reaches: the CPU tier's memory is host RAM, which the memory model does not cover.
UNBOUNDED_BYTES = 1 << 62


def tier_budget(tier: TierConfig) -> int:
    """The memory a tier plans its requests in: its smallest card's, unbounded on the CPU tier."""
    return tier.vram_bytes if tier.vram_bytes is not None else UNBOUNDED_BYTES


def cpu_tier() -> TierConfig:
    """One CPU replica running whatever model is configured (no card at all; `zit up --cpu`)."""
    return TierConfig(name="cpu")


def gpu_share(slots: int) -> float:
    """1/slots of a GPU, rounded down to Ray's resource unit (0.0001): Ray rounds 1/6 to 0.1667, and six of those
    would not fit one GPU."""
    return math.floor(10000 / slots) / 10000


def card_tier(name: str, cards: int, bf16: bool, vram_bytes: int, speed: float | None = None, num_gpus: float = 1,
              **fields) -> TierConfig:
    """A VRAM tier with one replica per card (per slot on split cards), each pinned to a card of this tier by the
    tier's Ray resource."""
    return TierConfig(
        name=name, device="cuda", num_gpus=num_gpus, num_cpus=1, num_replicas=cards, resources={name: 1.0},
        bf16=bf16, vram_bytes=vram_bytes, speed=speed, **fields,
    )


def slowest_link(cards: list) -> dict:
    """TierConfig's link fields for a tier of `cards`: the slowest card's host-to-device rate (cluster/link.py); none
    when no card's link is known."""
    from cluster.link import link_of

    links = [link_of(c) for c in cards]
    if all(link.source == "default" for link in links):
        return {"link_bytes_s": None, "link_detail": ""}
    slowest = min(links, key=lambda link: link.bytes_s)
    return {"link_bytes_s": slowest.bytes_s, "link_detail": slowest.detail or slowest.source}


def tier_link(tier: TierConfig):
    """The Link (cluster/link.py) the time model takes for `tier` as a whole: its slowest card's, else the default."""
    from cluster.link import DEFAULT_LINK, Link

    if tier.link_bytes_s is None or not tier.link_aware:
        return DEFAULT_LINK
    return Link(tier.link_bytes_s, "pcie", tier.link_detail)


def tiers_for_cards(cards: list, configured: list[TierConfig] | None = None) -> list[TierConfig]:
    """One tier per VRAM class present, smallest first, with one replica per card.

    `cards` are NVML snapshots (anything with `.tier`, `.bf16`, `.memory_total`, `.slots`). A tier's profile must be
    safe on every card in it, so it has bf16 only if all its cards do, and its memory budget is its smallest card's.
    A tier the operator configured keeps its settings (limits, profile overrides); its replica count, placement,
    bf16 and budget follow the cards found. Configured tiers with no card are dropped.

    Split cards (runtime/nodes.py split_card) count as `slots` cards of `card.memory_total / slots` each. Their tier's
    replicas then take 1/k of a GPU (k the most slots on one card), so k of them fit on a split card and one on a
    card of the tier's own size (which offers one `vram_<tier>`), and its profile caps each replica's CUDA allocator
    at the tier's budget (`max_memory_gb`): a replica that goes past its plan runs out of memory itself (and is
    retried) instead of taking its neighbour's.
    """
    by_name = {t.name: t for t in configured or []}
    groups: dict[str, list] = {}
    for card in cards:
        if card.tier is not None:
            groups.setdefault(card.tier, []).append(card)
    tiers = []
    for name in sorted(groups, key=tier_gib):
        members = groups[name]
        slots = max(getattr(c, "slots", 1) for c in members)
        found = {
            "num_replicas": sum(getattr(c, "slots", 1) for c in members),
            "bf16": all(c.bf16 for c in members),
            "vram_bytes": min(c.memory_total // getattr(c, "slots", 1) for c in members),
            "speed": min((c.speed for c in members if c.speed), default=None),
            "num_gpus": gpu_share(slots),
            **slowest_link(members),
        }
        profile = dict(by_name[name].profile) if name in by_name else {}
        if slots > 1:  # the cap, and the budget the tier is planned with, are the same number
            cap = min(profile.get("max_memory_gb") or math.inf, math.floor(found["vram_bytes"] / GIB * 100) / 100)
            profile["max_memory_gb"] = cap
            found["vram_bytes"] = int(cap * GIB)
        if name in by_name:
            base = by_name[name].model_dump()
            base.update(device="cuda", resources={**base["resources"], name: 1.0}, profile=profile, **found)
            tiers.append(TierConfig.model_validate(base))
        else:
            tiers.append(card_tier(name, found.pop("num_replicas"), profile=profile, **found))
    return tiers
