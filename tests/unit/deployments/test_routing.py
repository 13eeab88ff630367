import pytest

from cluster.tiers import TierConfig
from deployments.routing import Chunk, NoTierFits, choose_tier, plan_chunks, split_seeds


def tiers():
    return [
        TierConfig(name="small", max_pixels=512 * 512, max_batch=2, max_steps=20),
        TierConfig(name="large", max_pixels=2048 * 2048, max_batch=4),
    ]


def test_first_tier_that_accepts_wins():
    assert choose_tier(tiers(), 512, 512, 9).name == "small"
    assert choose_tier(tiers(), 1024, 1024, 9).name == "large"
    assert choose_tier(tiers(), 512, 512, 30).name == "large"


def test_tier_without_replicas_is_skipped():
    config = tiers()
    config[0].num_replicas = 0
    assert choose_tier(config, 256, 256, 9).name == "large"


def test_no_tier_fits_gives_every_reason_and_the_largest_accepted():
    with pytest.raises(NoTierFits) as info:
        choose_tier([TierConfig(name="small", max_pixels=512 * 512)], 1024, 1024, 9)
    assert "1048576 pixels, above this tier's 262144" in str(info.value)
    assert info.value.largest == {"small": {"max_pixels": 262144, "max_steps": 50}}


def test_seeds_are_consecutive_and_split_in_order():
    assert split_seeds(10, 5, 2) == [(10, 11), (12, 13), (14,)]
    assert split_seeds(0, 1, 4) == [(0,)]


def test_plan_uses_the_chosen_tiers_batch_limit():
    assert plan_chunks(tiers(), 256, 256, 9, 3, 7) == [Chunk("small", (7, 8)), Chunk("small", (9,))]
    assert plan_chunks(tiers(), 1024, 1024, 9, 5, 0) == [Chunk("large", (0, 1, 2, 3)), Chunk("large", (4,))]
