"""Tier choice and chunking on constructed tiers, with the real memory model and profiles."""

import pytest

from cluster.memory import largest_batch, predict_peak
from cluster.profiles import tier_profile
from cluster.tiers import TierConfig, tier_vram_bytes
from deployments.routing import NoTierFits, choose_tier

GIB = 1 << 30


def card_tier(name, bf16=True, replicas=1, **profile):
    return TierConfig(name=name, device="cuda", num_gpus=1, num_replicas=replicas, bf16=bf16,
                      vram_bytes=tier_vram_bytes(name), resources={name: 1}, profile=profile)


def mixed():
    tiers = [card_tier("vram_4", bf16=False), card_tier("vram_12"), card_tier("vram_24")]
    return tiers, {t.name: tier_profile(t) for t in tiers}


def test_the_cheapest_tier_that_holds_one_image_wins():
    tiers, profiles = mixed()
    assert choose_tier(tiers, profiles, 512, 512, 9).tier == "vram_4"
    big = choose_tier(tiers, profiles, 2048, 2048, 9)
    for tier in tiers:
        if tier.name == big.tier:
            break
        assert predict_peak(2048, 2048, 1, profiles[tier.name]).total > tier.vram_bytes or \
            2048 * 2048 > profiles[tier.name].max_pixels


def test_chunks_are_at_most_the_largest_batch_the_smallest_card_holds_and_even():
    tiers, profiles = mixed()
    plan = choose_tier(tiers, profiles, 1024, 1024, 9, n=7)
    tier = next(t for t in tiers if t.name == plan.tier)
    batch = largest_batch(1024, 1024, profiles[plan.tier], tier.vram_bytes)
    assert sum(plan.chunks) == 7 and max(plan.chunks) <= batch
    assert max(plan.chunks) - min(plan.chunks) <= 1


def test_tier_without_replicas_is_skipped():
    tiers, profiles = mixed()
    tiers[0].num_replicas = 0
    assert choose_tier(tiers, profiles, 256, 256, 9).tier == "vram_12"


def test_steps_above_the_profile_limit_are_refused_with_the_limit():
    tiers = [card_tier("vram_12", max_steps=20)]
    with pytest.raises(NoTierFits, match="steps=30 is above profile vram_12's max_steps 20"):
        choose_tier(tiers, {t.name: tier_profile(t) for t in tiers}, 512, 512, 30)


def test_no_tier_fits_gives_every_reason_and_the_largest_each_accepts():
    tiers = [card_tier("vram_4", bf16=False)]
    profiles = {t.name: tier_profile(t) for t in tiers}
    with pytest.raises(NoTierFits) as info:
        choose_tier(tiers, profiles, 2048, 2048, 9)
    assert "vram_4" in info.value.reasons
    largest = info.value.largest["vram_4"]
    side = largest["side_at_n1"]
    assert 0 < side < 2048 and largest["n_at_size"] == 0
    assert choose_tier(tiers, profiles, side, side, 9).tier == "vram_4"  # what it says it accepts, it accepts


def test_cpu_tier_has_no_memory_budget_only_profile_limits():
    tiers = [TierConfig(name="cpu")]
    profiles = {"cpu": tier_profile(tiers[0])}
    assert choose_tier(tiers, profiles, 2048, 2048, 9, n=profiles["cpu"].max_n).chunks == [profiles["cpu"].max_n]


def test_plan_uses_the_chosen_tiers_chunk():
    tiers = [TierConfig(name="cpu", profile={"max_n": 2})]
    profiles = {"cpu": tier_profile(tiers[0])}
    assert choose_tier(tiers, profiles, 256, 256, 9, 3).chunks == [2, 1]
    assert choose_tier(tiers, profiles, 256, 256, 9, 5).chunks == [2, 2, 1]


def test_a_guided_request_goes_where_its_doubled_activations_fit():
    """At 1024x1024 the 4 GB card holds one unguided image but not a guided one (guidance doubles the transformer's
    batch): the guided request goes to the next tier, and if none holds it the error says guidance is why."""
    tiers, profiles = mixed()
    assert choose_tier(tiers, profiles, 1024, 1024, 9).tier == "vram_4"
    assert predict_peak(1024, 1024, 1, profiles["vram_4"], cfg=True).total > tiers[0].vram_bytes
    assert choose_tier(tiers, profiles, 1024, 1024, 9, cfg=True).tier == "vram_12"
    small = tiers[:1]
    with pytest.raises(NoTierFits, match="classifier-free guidance") as info:
        choose_tier(small, profiles, 1024, 1024, 9, cfg=True)
    side = info.value.largest["vram_4"]["side_at_n1"]  # the largest guided request it takes
    assert 0 < side < 1024 and choose_tier(small, profiles, side, side, 9, cfg=True).tier == "vram_4"


def test_guided_chunks_are_the_largest_guided_batch():
    tiers, profiles = mixed()
    plain = choose_tier(tiers[1:2], profiles, 1024, 1024, 9, n=4)
    guided = choose_tier(tiers[1:2], profiles, 1024, 1024, 9, n=4, cfg=True)
    batch = largest_batch(1024, 1024, profiles["vram_12"], tiers[1].vram_bytes, cfg=True)
    assert plain.chunks == [4] and guided.chunks == [batch] * (4 // batch) and batch < 4


def test_a_tiers_dtype_sets_the_profiles_compute_dtype_and_is_refused_where_the_card_cannot_run_it():
    from cluster.profiles import ProfileError

    tier = TierConfig(name="vram_12", device="cuda", num_gpus=1, bf16=True, vram_bytes=tier_vram_bytes("vram_12"))
    assert tier_profile(tier).compute_dtype == "bfloat16"
    assert tier_profile(tier.model_copy(update={"dtype": "float32"})).compute_dtype == "float32"
    no_bf16 = TierConfig(name="vram_6", device="cuda", num_gpus=1, bf16=False, dtype="float16",
                         vram_bytes=tier_vram_bytes("vram_6"))
    with pytest.raises(ProfileError, match="float16"):
        tier_profile(no_bf16)
