"""The planning math (cluster/planning.py): chunks, bf16 per tier, guided batches, and docs/memory.md against it."""

import importlib.util

from cluster.memory import largest_batch, load_calibration
from cluster.planning import default_tiers, plan, split_n
from cluster.profiles import default_profile


def test_n_is_split_into_chunks_the_tier_holds():
    rows = {r["tier"]: r for r in plan(1024, 1024, 5)}
    for tier, (budget, bf16) in default_tiers().items():
        batch = largest_batch(1024, 1024, default_profile(tier, bf16), budget, load_calibration())
        chunks = rows[tier]["chunks"]
        assert sum(chunks) == 5 and max(chunks) <= batch and len(chunks) == -(-5 // batch)
    assert split_n(5, 2) == [2, 2, 1] and split_n(4, 4) == [4] and split_n(3, 1) == [1, 1, 1]


def test_typical_cards_decide_bf16_per_tier():
    tiers = default_tiers()
    assert not tiers["vram_4"][1] and not tiers["vram_6"][1]
    assert all(tiers[t][1] for t in ("vram_8", "vram_12", "vram_16", "vram_24"))


def test_memory_doc_matches_the_model(repo_root):
    spec = importlib.util.spec_from_file_location("memory_table", repo_root / "bench" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--check"]) == 0, "docs/memory.md is stale: run python bench/memory_table.py"


# -- classifier-free guidance ----------------------------------------------------------------------------------------


def test_a_guided_batch_is_split_into_smaller_chunks_where_needed():
    """Guidance doubles the transformer's batch: at 1024x1024 the 12 GB tier holds 4 images per call unguided and
    only 2 guided; the 24 GB tier still holds 4."""
    cal = load_calibration()
    plain = {r["tier"]: r for r in plan(1024, 1024, 4, calibration=cal)}
    guided = {r["tier"]: r for r in plan(1024, 1024, 4, calibration=cal, cfg=True)}
    assert plain["vram_12"]["chunks"] == [4] and guided["vram_12"]["chunks"] == [2, 2]
    assert plain["vram_24"]["chunks"] == guided["vram_24"]["chunks"] == [4]
    for tier, (budget, bf16) in default_tiers().items():
        batch = largest_batch(1024, 1024, default_profile(tier, bf16), budget, cal, cfg=True)
        assert max(guided[tier]["chunks"], default=0) == min(batch, 4)
        assert guided[tier]["largest"]["n_at_size"] == batch <= plain[tier]["largest"]["n_at_size"]
        assert guided[tier]["peak_gb"] >= plain[tier]["peak_gb"] or guided[tier]["chunks"] != plain[tier]["chunks"]


# -- zit plan --config: the service's profiles ---------------------------------------------------------------------


# -- zit calibrate --model PATH ------------------------------------------------------------------------------------


# -- the full-size path and the time budget ------------------------------------------------------------------------


