import re
from types import SimpleNamespace

import pytest

from cluster.tiers import (
    VRAM_TIERS_GIB,
    ZIT_VRAM_TIERS_GB_ENV,
    TierConfig,
    classify,
    tier_vram_bytes,
    tiers_for_cards,
    vram_tiers,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    "card, total_mib, tier",
    [
        ("GTX 1650 (recent driver)", 3911, "vram_4"),
        ("GTX 1650", 4096, "vram_4"),
        ("RTX 2060", 6144, "vram_6"),
        ("RTX 3070", 8192, "vram_8"),
        ("RTX 3080 10 GB serves as 8", 10240, "vram_8"),
        ("RTX 3060", 12288, "vram_12"),
        ("RTX 4060 Ti 16 GB", 16380, "vram_16"),
        ("RTX 4090", 24564, "vram_24"),
        ("RTX 5090 serves as 24+", 32607, "vram_24"),
        ("2 GB card", 2048, None),
        ("3.5 GB is below 90 % of 4", 3500, None),
    ],
)
def test_cards_are_classified_by_total_memory_with_a_margin(card, total_mib, tier):
    assert classify(total_mib * MIB) == tier, card


def test_classification_uses_a_configured_table():
    table = {"small": 4, "big": 16}
    assert classify(12288 * MIB, table) == "small"
    assert classify(16384 * MIB, table) == "big"


def test_tier_vram_is_the_nominal_size():
    assert tier_vram_bytes("vram_12") == 12 << 30


@pytest.mark.parametrize(
    "total_mib, tier",
    [(3911, "vram_4"), (6144, "vram_4"), (10240, "vram_10"), (12288, "vram_10"), (20480, "vram_20"),
     (24564, "vram_20"), (32607, "vram_32"), (2048, None)],
)
def test_cards_are_classified_by_the_table_in_the_environment(monkeypatch, total_mib, tier):
    """ZIT_VRAM_TIERS_GB=4,10,20,32: an RTX 3080 (10 GB) is a vram_10 card, an RTX 4090 a vram_20, an RTX 5090 a
    vram_32, with the same 90 % margin."""
    monkeypatch.setenv(ZIT_VRAM_TIERS_GB_ENV, "20, 4,10,32")  # any order, spaces allowed
    assert list(vram_tiers()) == ["vram_4", "vram_10", "vram_20", "vram_32"]
    assert classify(total_mib * MIB) == tier
    if tier:
        assert tier_vram_bytes(tier) == int(tier[5:]) << 30


def test_the_shipped_table_is_in_force_without_the_variable(monkeypatch):
    monkeypatch.delenv(ZIT_VRAM_TIERS_GB_ENV, raising=False)
    assert vram_tiers() == VRAM_TIERS_GIB and classify(10240 * MIB) == "vram_8"


@pytest.mark.parametrize("spec, says", [
    ("4,x", "'x' is not a whole number of GB"),
    ("4,7.5", "'7.5' is not a whole number of GB"),
    ("4,,8", "'' is not a whole number"),
    ("0,8", "'0' is not a whole number of GB from 1 to 1024"),
    ("4,2048", "'2048' is not a whole number of GB from 1 to 1024"),
    ("4,8,4", "4 GB is listed twice"),
])
def test_a_malformed_table_is_refused_naming_the_variable(monkeypatch, spec, says):
    monkeypatch.setenv(ZIT_VRAM_TIERS_GB_ENV, spec)
    with pytest.raises(ValueError, match=f"^{ZIT_VRAM_TIERS_GB_ENV}=.*{re.escape(says)}"):
        vram_tiers()
    with pytest.raises(ValueError, match=re.escape(says)):
        classify(8192 * MIB)


def test_tiers_of_a_configured_table_are_ordered_by_size(monkeypatch):
    monkeypatch.setenv(ZIT_VRAM_TIERS_GB_ENV, "4,10,20")
    tiers = tiers_for_cards([card(24564), card(3911, False), card(10240), card(20480)])
    assert [(t.name, t.num_replicas) for t in tiers] == [("vram_4", 1), ("vram_10", 1), ("vram_20", 2)]


def card(mib: int, bf16: bool = True):
    return SimpleNamespace(tier=classify(mib * MIB), bf16=bf16, memory_total=mib * MIB, speed=None)


def test_one_tier_per_class_present_smallest_first_one_replica_per_card():
    tiers = tiers_for_cards([card(24564), card(3911, False), card(2048), card(12288), card(4096, False)])
    assert [(t.name, t.num_replicas) for t in tiers] == [("vram_4", 2), ("vram_12", 1), ("vram_24", 1)]
    assert all(t.device == "cuda" and t.num_gpus == 1 and t.resources == {t.name: 1.0} for t in tiers)


def test_a_tier_is_as_safe_and_as_small_as_its_weakest_card():
    (tier,) = tiers_for_cards([card(8192, bf16=True), card(8000, bf16=False)])  # RTX 3070 + RTX 2070 Super
    assert (tier.name, tier.bf16, tier.vram_bytes) == ("vram_8", False, 8000 * MIB)


def test_configured_tier_keeps_its_settings_but_follows_the_cards():
    configured = [TierConfig(name="vram_12", profile={"max_n": 2, "vae_tiling": True}), TierConfig(name="cpu")]
    (tier,) = tiers_for_cards([card(12288)] * 3, configured)
    assert (tier.profile, tier.num_replicas, tier.device) == ({"max_n": 2, "vae_tiling": True}, 3, "cuda")
    assert tier.resources == {"vram_12": 1.0} and tier.bf16 and tier.vram_bytes == 12288 * MIB


def test_cuda_tier_without_a_gpu_is_refused_with_both_values():
    with pytest.raises(ValueError, match="device='cuda' needs num_gpus > 0"):
        TierConfig(name="vram_8", device="cuda", num_gpus=0)


def test_split_cards_add_slots_to_the_smaller_tier_with_a_gpu_share_and_a_memory_cap(repo_root):
    from cluster.nvml import load_fleet
    from runtime.nodes import apply_splits

    cards = apply_splits(load_fleet(repo_root / "cluster" / "fleets" / "mixed.yaml"), ["RTX 4090=vram_12"])
    tiers = {t.name: t for t in tiers_for_cards(cards)}
    assert "vram_24" not in tiers  # the only 24 GB card now serves vram_12
    twelve = tiers["vram_12"]
    assert twelve.num_replicas == 3  # the RTX 3060, and two slots of the RTX 4090
    assert twelve.num_gpus == 0.5 and twelve.resources == {"vram_12": 1.0}
    # Planned with the smallest slot, capped there: the 4090's half (24564 MiB / 2) rounded down to 0.01 GiB.
    assert twelve.profile["max_memory_gb"] == 11.99
    assert twelve.vram_bytes == int(11.99 * (1 << 30)) <= (24564 << 20) // 2
    # Unsplit tiers are as before: a whole GPU, no cap.
    assert tiers["vram_8"].num_gpus == 1 and "max_memory_gb" not in tiers["vram_8"].profile


@pytest.mark.parametrize("slots", range(1, 9))
def test_a_gpu_share_times_its_slots_fits_one_gpu_in_rays_units(slots):
    from cluster.tiers import gpu_share

    share = gpu_share(slots)
    assert round(share * 10000) == share * 10000  # a whole number of Ray's 0.0001 units: no rounding up
    assert slots * share <= 1 and share > 1 / slots - 0.0001
