"""Where the text-encoder stage runs (cluster/stages.py): on the card with the most to spare after its largest image,
resident or offloaded as the memory model says, else in every generator; and the tiers planned beside it."""

import pytest

from cluster.memory import encoder_peak, largest_square, load_calibration
from cluster.nvml import load_fleet
from cluster.profiles import tier_profile
from cluster.stages import place_text_encoder, spare_bytes, stage_profile, staged_tiers
from cluster.tiers import GIB, tiers_for_cards

FLEETS = "cluster/fleets"


def fleet(name):
    cards = load_fleet(f"{FLEETS}/{name}.yaml")
    tiers = tiers_for_cards(cards)
    return cards, tiers, {t.name: tier_profile(t) for t in tiers}


def test_the_mixed_fleet_puts_the_stage_on_the_card_with_the_most_to_spare():
    cards, tiers, profiles = fleet("mixed")
    placement = place_text_encoder(cards, tiers, profiles)
    by_tier = {t.name: t for t in tiers}
    spares = {c.uuid: spare_bytes(c, by_tier[c.tier], profiles[c.tier], load_calibration()) for c in cards}
    assert placement.where == "card" and placement.cards == (max(spares, key=spares.get),)
    host = next(c for c in cards if c.uuid == placement.cards[0])
    assert host.tier == "vram_24" and placement.tiers == ("vram_24",)
    # Resident needs more than the 4090 has to spare after its largest image; offloaded fits.
    assert encoder_peak(stage_profile(True, "gpu")).total > spares[host.uuid] >= placement.reserve_bytes
    assert placement.profile.text_encoder == "offload" and placement.reserve_bytes == encoder_peak(
        placement.profile).total


def test_the_stage_never_takes_a_size_its_host_tier_serves():
    cards, tiers, profiles = fleet("mixed")
    placement = place_text_encoder(cards, tiers, profiles)
    staged = {t.name: t for t in staged_tiers(tiers, placement.where, list(placement.tiers), placement.reserve_bytes)}
    for tier in tiers:
        before = largest_square(profiles[tier.name], tier.vram_bytes, 1)
        after = largest_square(tier_profile(staged[tier.name]), staged[tier.name].vram_bytes, 1)
        assert after >= before, tier.name  # the host tier keeps its largest image; the others lose their encoder
    assert staged["vram_24"].vram_bytes == tiers[-1].vram_bytes - placement.reserve_bytes


def test_a_single_small_card_keeps_its_own_encoder_and_card_placement_refuses_with_the_numbers():
    cards, tiers, profiles = fleet("single-4gb")
    assert place_text_encoder(cards, tiers, profiles).where == "local"
    with pytest.raises(ValueError, match="GiB to spare"):
        place_text_encoder(cards, tiers, profiles, placement="card")


def test_a_large_fleet_keeps_the_encoder_resident_on_its_roomiest_card():
    cards, tiers, profiles = fleet("large")
    placement = place_text_encoder(cards, tiers, profiles, replicas=2)
    assert placement.where == "card" and len(placement.cards) == 2
    assert {c.name for c in cards if c.uuid in placement.cards} == {"NVIDIA GeForce RTX 5090"}
    assert placement.profile.text_encoder == "gpu" and placement.profile.compute_dtype == "bfloat16"


def test_cpu_and_local_are_taken_as_asked():
    cards, tiers, profiles = fleet("mixed")
    assert place_text_encoder(cards, tiers, profiles, "local").where == "local"
    cpu = place_text_encoder(cards, tiers, profiles, "cpu")
    assert cpu.where == "cpu" and not cpu.cards and cpu.profile.text_encoder == "cpu"


def test_staged_tiers_drop_every_generators_encoder_and_take_the_reserve_once():
    cards, tiers, profiles = fleet("mixed")
    placement = place_text_encoder(cards, tiers, profiles)
    once = staged_tiers(tiers, "card", ["vram_24"], placement.reserve_bytes)
    assert all(tier_profile(t).text_encoder == "stage" for t in once)
    assert staged_tiers(once, "card", ["vram_24"], placement.reserve_bytes) == once
    assert staged_tiers(tiers, "local", [], 0) == tiers


def test_without_bf16_the_stage_computes_in_float32_from_bf16_weights():
    profile = stage_profile(False, "offload")
    assert (profile.compute_dtype, profile.text_encoder_storage) == ("float32", "bfloat16")
    assert encoder_peak(profile).total > encoder_peak(stage_profile(True, "offload")).total
    with pytest.raises(ValueError, match="on a card"):
        encoder_peak(stage_profile(True, "cpu"))
    assert encoder_peak(stage_profile(True, "gpu")).total > 8 * GIB  # Qwen3-4B resident in bf16
