"""A card's PCIe link: what NVML says of it, the host-to-device copy rate that follows, and how to measure it.

Offloading tiers stream the transformer's weights from host memory every denoising step (12.3 GB in bf16, 6.2 GB in
fp8), so the link is their clock. Mixed fleets put cards on PCIe 3.0 boards, in x4 and x8 slots, and on x1 risers
(mining-style rigs): a 4 GB card streams a step in about 1 s on a good x16 slot and in about 15 s on an x1 riser.

The copy rate of a card (`Link`), best source first:
- `measured`: a short pinned host-to-device copy timed on the card when its replica starts (CUDA only,
  `measure_copy_rate`);
- `pcie`: NVML's link generation x width x LANE_BYTES_S x LINK_EFFICIENCY. The generation taken is the link's
  maximum: NVIDIA cards drop the current generation at idle to save power (an idle card reads gen 1) and raise it
  under load, so the current one says little when the card is read idle. The width is the current one: a link that
  trained down to x1 (a common fault of risers) stays there;
- `default`: PCIE_BYTES_S, for a card whose link NVML does not report (and every card when a service is told to
  ignore links, `link_aware: false`).

A link running below its maximum is `degraded`: narrower than it can be, or a lower generation while the card is
busy (so not the idle power saving). /metrics exports both readings and an alert fires on it (docs/observability.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# Host-to-device copy rate a consumer board sustains with pinned memory when the link is not known: PCIe 3.0 x16
# (PCIe 4.0 x16 sustains about twice that; x8 slots and PCIe 3.0 boards are common in mixed fleets).
PCIE_BYTES_S = 12e9
# Bytes per second one lane carries after line encoding, by PCIe generation (8b/10b for 1-2, 128b/130b for 3-5,
# FLIT for 6).
LANE_BYTES_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
# Share of the lane rate a pinned host-to-device copy sustains (packet headers, flow control): about 12.6 GB/s on
# PCIe 3.0 x16 and 0.79 GB/s on a PCIe 3.0 x1 riser, as such copies measure.
LINK_EFFICIENCY = 0.8
# The pinned buffer a replica copies to its card to measure the link, and how many times (the best one counts).
MEASURE_BYTES = 64 << 20
# Utilisation above which a card counts as busy for `degraded` (and the link alert): its link is at full speed then.
BUSY_PCT = 50
MEASURE_REPEATS = 3


@dataclass(frozen=True)
class Link:
    """The host-to-device copy rate the time model uses for a card, and where it comes from."""

    bytes_s: float
    source: str  # 'measured', 'pcie' or 'default'
    detail: str = ""  # e.g. 'gen3 x1'

    def describe(self) -> str:
        """'0.79 GB/s (gen3 x1)', '12.6 GB/s (measured)', '12.0 GB/s (default: link unknown)'."""
        why = {"measured": "measured", "pcie": self.detail, "default": "default: link unknown"}.get(self.source,
                                                                                                  self.source)
        return f"{self.bytes_s / 1e9:.2f} GB/s ({why})"

    def as_dict(self) -> dict:
        return {"bytes_s": self.bytes_s, "gb_s": round(self.bytes_s / 1e9, 3), "source": self.source,
                "detail": self.detail}


DEFAULT_LINK = Link(PCIE_BYTES_S, "default")


def pcie_bytes_s(gen: int, width: int) -> float:
    """Sustained host-to-device bytes per second of a PCIe link of generation `gen` and `width` lanes."""
    return LANE_BYTES_S[min(max(gen, 1), max(LANE_BYTES_S))] * width * LINK_EFFICIENCY


def link_of(card, measured_bytes_s: float | None = None) -> Link:
    """The copy rate of `card` (an NVML snapshot: anything with pcie_gen, pcie_width, pcie_max_gen), best source
    first: `measured_bytes_s` (timed on the card), else its PCIe generation (the maximum: see the module docstring)
    x current width, else the default."""
    if measured_bytes_s:
        return Link(float(measured_bytes_s), "measured")
    gen = getattr(card, "pcie_max_gen", None) or getattr(card, "pcie_gen", None)
    width = getattr(card, "pcie_width", None)
    if gen and width:
        return Link(pcie_bytes_s(gen, width), "pcie", f"gen{gen} x{width}")
    return DEFAULT_LINK


def degraded(card) -> str | None:
    """Why `card`'s link runs below its maximum, or None: narrower than it can be, or a lower generation while the
    card is busy (over BUSY_PCT utilisation; idle cards lower the generation to save power: that is no fault)."""
    width, max_width = getattr(card, "pcie_width", None), getattr(card, "pcie_max_width", None)
    gen, max_gen = getattr(card, "pcie_gen", None), getattr(card, "pcie_max_gen", None)
    if width and max_width and width < max_width:
        return f"link width x{width} of x{max_width}"
    busy = (getattr(card, "utilization_pct", None) or 0) > BUSY_PCT
    if busy and gen and max_gen and gen < max_gen:
        return f"link generation {gen} of {max_gen} while busy"
    return None


def measure_copy_rate(device="cuda", nbytes: int = MEASURE_BYTES, repeats: int = MEASURE_REPEATS) -> float:
    """Host-to-device bytes per second of the current CUDA card: a pinned buffer of `nbytes` copied `repeats` times,
    the fastest copy counted (the first pays for waking the link from its idle generation). Takes well under a
    second on any link (64 MiB: 5 ms at x16, 85 ms on an x1 riser); frees what it allocated."""
    import time

    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    card = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    try:
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            card.copy_(host, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
    finally:
        del host, card
        torch.cuda.empty_cache()
    return nbytes / best
