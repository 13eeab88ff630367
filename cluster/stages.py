"""Where the text-encoder stage runs (deployments/encoder.py), and what it takes there. Pure: cards, tiers and the
memory model in, a placement out.

Z-Image-Turbo's text encoder (Qwen3-4B, about 8 GB in bf16) turns a prompt into embeddings once per request; the
generators then take embeddings instead of the prompt. Where it runs:
- 'card' (the default, `auto`): on the card with the most VRAM to spare after its own replica, in its own process.
  Spare is what the card has left once its replica runs the largest single image its tier accepts (so the stage
  never takes away a size the fleet serves): capacity - predicted peak of that image. The encoder is resident there
  when it fits, else group-offloaded (one layer in flight, streamed from host memory for each new prompt); the card's
  tier is then planned with that much less memory (`with_stage_reserve`).
- 'cpu': on the head's CPU (slow for the real encoder, about a minute a prompt; for small fleets without a card to
  spare and with repeated prompts, which the stage's cache answers at once).
- 'local': in every generator, as the pipeline has it (what `auto` falls back to when no card has room: a single
  4 GB card keeps working as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cluster.memory import GIB, Calibration, encoder_peak, largest_square, load_calibration, predict_peak
from cluster.profiles import Profile
from cluster.tiers import TierConfig, tier_budget

Placement = Literal["auto", "card", "cpu", "local"]
# The stage's profile name, in metrics and the fleet view.
STAGE = "text_encoder"


def stage_profile(bf16: bool, weights: Literal["gpu", "offload", "cpu"]) -> Profile:
    """The text-encoder stage's profile on a card with (bf16) or without bf16 support, the encoder resident ('gpu'),
    group-offloaded ('offload') or on the CPU. Without bf16 it computes in float32 from bf16-stored weights, layer by
    layer, as the generators' profiles do; on the CPU it computes in bf16 (half the host memory of float32)."""
    compute = "bfloat16" if bf16 or weights == "cpu" else "float32"
    return Profile(
        name=STAGE if compute == "bfloat16" else f"{STAGE}-fp32", compute_dtype=compute, weights="resident",
        storage_dtype=None if compute == "bfloat16" else "bfloat16", text_encoder=weights,
        offload_stream=weights == "offload", vae_tiling=False, vae_slicing=False,
    )


@dataclass(frozen=True)
class StagePlacement:
    """Where the stage runs: `where` ('card', 'cpu' or 'local'), on which `cards` (NVML uuids, best first), under
    which `profile`, taking `reserve_bytes` of each card; `reason` says why, with the numbers."""

    where: Literal["card", "cpu", "local"]
    reason: str
    cards: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()  # the tiers of `cards`
    profile: Profile | None = None
    reserve_bytes: int = 0


def spare_bytes(card, tier: TierConfig, profile: Profile, cal: Calibration) -> int:
    """What `card` (a GpuSnapshot) has left once its replica runs the largest single image its tier accepts."""
    capacity = card.memory_total - card.foreign_memory
    side = largest_square(profile, tier_budget(tier), 1, cal)
    keep = predict_peak(side, side, 1, profile, cal).total if side else capacity
    return capacity - keep


def place_text_encoder(cards: list, tiers: list[TierConfig], profiles: dict[str, Profile],
                       placement: Placement = "auto", replicas: int = 1,
                       calibration: Calibration | None = None) -> StagePlacement:
    """The stage's placement for `cards` (GpuSnapshots) serving `tiers` (with their `profiles`), as the operator asks.

    Algorithm: for 'auto' and 'card', every healthy card of a tier that is not split into slots is a candidate; its
    spare is `spare_bytes`; the stage goes resident where its resident peak fits the spare, else offloaded where that
    fits; the `replicas` cards with the most spare (then the most memory, the fastest) that hold the stage host it,
    all under one profile (offloaded and float32 as soon as one of them needs it). With no such card, 'auto' keeps
    the encoder in every generator ('local') and 'card' raises ValueError with each card's numbers. 'cpu' and
    'local' are taken as asked.
    """
    if placement == "local":
        return StagePlacement("local", "asked for: every generator keeps its own text encoder")
    if placement == "cpu":
        return StagePlacement("cpu", "asked for: the stage runs on the head's CPU", profile=stage_profile(True, "cpu"))
    cal = calibration or load_calibration()
    by_name = {t.name: t for t in tiers}
    fitting, refused = [], []
    for card in cards:
        tier = by_name.get(card.tier)
        if tier is None or card.error or getattr(card, "slots", 1) > 1:
            continue
        spare = spare_bytes(card, tier, profiles[tier.name], cal)
        for weights in ("gpu", "offload"):
            need = encoder_peak(stage_profile(card.bf16, weights), cal).total
            if need <= spare:
                fitting.append((spare, card.memory_total, card.speed or 0.0, -card.index, card, weights))
                break
        else:
            refused.append(f"{card.name} [{card.tier}] has {max(0, spare) / GIB:.2f} GiB to spare after its largest "
                           f"image, the offloaded stage needs {need / GIB:.2f} GiB")
    if not fitting:
        why = "; ".join(refused) or "no card in the fleet"
        if placement == "card":
            raise ValueError(f"no card can host the text-encoder stage: {why}. Use text_encoder placement 'cpu' "
                             "or 'local'")
        return StagePlacement("local", f"no card has room for the stage ({why}): every generator keeps its own "
                                       "text encoder")
    chosen = sorted(fitting, key=lambda f: f[:4], reverse=True)[:max(1, replicas)]
    weights = "offload" if any(f[5] == "offload" for f in chosen) else "gpu"
    profile = stage_profile(all(f[4].bf16 for f in chosen), weights)
    reserve = encoder_peak(profile, cal).total
    names = ", ".join(f"{f[4].name} [{f[4].tier}] ({f[0] / GIB:.2f} GiB spare)" for f in chosen)
    return StagePlacement("card", f"on the card(s) with the most VRAM to spare: {names}; encoder "
                                  f"{'resident' if weights == 'gpu' else 'group-offloaded'}, "
                                  f"{reserve / GIB:.2f} GiB each",
                          tuple(f[4].uuid for f in chosen), tuple(dict.fromkeys(f[4].tier for f in chosen)), profile,
                          reserve)


def place_on_tiers(tiers: list[TierConfig], profiles: dict[str, Profile], hosting: list[str], replicas: int = 1,
                   calibration: Calibration | None = None) -> StagePlacement:
    """The stage on cards of the `hosting` tiers, when only the tiers are known (a Helm chart names the worker group
    whose pods host it; their cards' uuids come later): each tier stands for its smallest card (its budget, its
    bf16), and the placement is `place_text_encoder`'s 'card' on those. ValueError when none of them has room."""
    from types import SimpleNamespace

    cards = [SimpleNamespace(name=f"a {t.name} card", uuid=t.name, tier=t.name, index=i, error=None, slots=1,
                             memory_total=t.vram_bytes, foreign_memory=0, bf16=t.bf16, speed=t.speed)
             for i, t in enumerate(tiers) if t.name in hosting and t.vram_bytes is not None]
    placement = place_text_encoder(cards, tiers, profiles, "card", replicas, calibration)
    return StagePlacement("card", placement.reason, (), placement.tiers, placement.profile, placement.reserve_bytes)


def staged_tiers(tiers: list[TierConfig], where: str | None, hosting: list[str], reserve_bytes: int
                 ) -> list[TierConfig]:
    """The tiers as they run beside a stage that encodes for them (`where` 'card' or 'cpu'): every profile without
    its own encoder (text_encoder='stage'), and each tier in `hosting` planned with `reserve_bytes` less memory (the
    stage's peak on its card). Anything else: the tiers unchanged."""
    if where not in ("card", "cpu"):
        return tiers
    out = []
    for tier in tiers:
        if tier.profile.get("text_encoder") == "stage":  # staged already: the reserve is taken once
            out.append(tier)
            continue
        update = {"profile": {**tier.profile, "text_encoder": "stage"}}
        if tier.name in hosting and tier.vram_bytes is not None:
            update["vram_bytes"] = tier.vram_bytes - reserve_bytes
        out.append(tier.model_copy(update=update))
    return out
