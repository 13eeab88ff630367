"""Tier profiles (cluster/profiles.py): choice by bf16 support, overrides, and applying them to the real tiny pipeline."""

import pytest
import torch

from cluster.memory import fits, load_calibration
from cluster.profiles import ProfileError, apply_profile, default_profile, resolve_profile
from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes

TIERS = list(VRAM_TIERS_GIB)


@pytest.mark.parametrize("tier", TIERS)
def test_no_plain_fp16_compute_on_any_card(tier):
    """Cards without bf16 compute in float32 (fp16 gives black images); cards with bf16 compute in bf16."""
    assert default_profile(tier, bf16=False).compute_dtype == "float32"
    assert default_profile(tier, bf16=True).compute_dtype == "bfloat16"


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("bf16", [True, False])
def test_every_shipped_profile_accepts_512_n1_on_its_nominal_vram(tier, bf16):
    profile = default_profile(tier, bf16)
    assert fits(512, 512, 1, profile, tier_vram_bytes(tier), load_calibration()) is None, profile.technique()


def test_float32_profiles_keep_weights_stored_small():
    """A float32 card stores the 12.3 GB transformer in bf16 or fp8 and upcasts layer by layer, never 24.6 GB."""
    for tier in TIERS:
        assert default_profile(tier, bf16=False).transformer_storage in ("bfloat16", "float8_e4m3fn")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_override_on_a_card_without_bf16_is_refused(dtype):
    with pytest.raises(ProfileError, match="compute_dtype='float32'"):
        resolve_profile("vram_6", bf16=False, overrides={"compute_dtype": dtype})


def test_unknown_override_is_named_with_the_known_knobs():
    with pytest.raises(ProfileError, match=r"\['offload_to_cpu'\].*known knobs.*vae_tiling"):
        resolve_profile("vram_12", True, {"offload_to_cpu": True})


def test_overrides_apply_and_are_validated():
    profile = resolve_profile("vram_12", True, {"vae_tile_px": 512, "attention": "xformers", "max_memory_gb": 10})
    assert (profile.vae_tile_px, profile.attention, profile.max_memory_gb) == (512, "xformers", 10)
    with pytest.raises(ProfileError, match="vae_tile_px"):
        resolve_profile("vram_12", True, {"vae_tile_px": 100})
    with pytest.raises(ProfileError, match="text_encoder='offload'"):
        resolve_profile("vram_24", True, {"weights": "model_cpu_offload", "text_encoder": "gpu"})


def test_unknown_tier_lists_the_known_ones():
    with pytest.raises(ProfileError, match="vram_4"):
        default_profile("vram_10", True)


@pytest.mark.parametrize("tier, shipped", [("vram_10", "vram_8"), ("vram_20", "vram_16"), ("vram_3", "vram_4"),
                                           ("vram_48", "vram_24")])
@pytest.mark.parametrize("bf16", [True, False])
def test_a_configured_tier_runs_the_techniques_of_the_shipped_tier_below_it(monkeypatch, tier, shipped, bf16):
    monkeypatch.setenv("ZIT_VRAM_TIERS_GB", "3,4,8,10,16,20,24,48")
    derived, base = default_profile(tier, bf16), default_profile(shipped, bf16)
    assert derived.name == base.name.replace(shipped, tier)
    assert derived.model_dump(exclude={"name"}) == base.model_dump(exclude={"name"})
    assert resolve_profile(tier, bf16, {"max_n": 1}).max_n == 1  # overrides apply as on a shipped tier


def test_a_configured_tiers_limits_follow_its_own_size(monkeypatch):
    """vram_10 runs vram_8's techniques but is planned with 10 GiB, so it takes what 8 GiB cannot (two 1536x1536
    images in float32); vram_3 runs vram_4's with 3 GiB, so it takes less."""
    from cluster.memory import largest_batch, largest_square

    monkeypatch.setenv("ZIT_VRAM_TIERS_GB", "3,4,8,10,24")
    cal = load_calibration()
    assert (tier_vram_bytes("vram_10"), tier_vram_bytes("vram_3")) == (10 << 30, 3 << 30)
    ten, eight = default_profile("vram_10", False), default_profile("vram_8", False)
    assert largest_batch(1536, 1536, ten, tier_vram_bytes("vram_10"), cal) == 2
    assert largest_batch(1536, 1536, eight, tier_vram_bytes("vram_8"), cal) == 1
    three, four = default_profile("vram_3", True), default_profile("vram_4", True)
    assert 0 < largest_square(three, tier_vram_bytes("vram_3"), 1, cal) < largest_square(four, 4 << 30, 1, cal)


def test_a_tier_in_no_table_is_refused_with_how_to_add_it(monkeypatch):
    monkeypatch.setenv("ZIT_VRAM_TIERS_GB", "4,10")
    with pytest.raises(ProfileError, match=r"'vram_20'.*'vram_10'.*ZIT_VRAM_TIERS_GB or --tiers"):
        default_profile("vram_20", True)
    assert default_profile("vram_24", True).name == "vram_24"  # a shipped tier keeps its profile whatever the table


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    from cluster.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir, "cpu")


def _generate(pipe, n=1):
    from cluster.pipeline import run_job
    from cluster.requests import GenerationJob

    job = GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=list(range(n)))
    images, seconds = run_job(pipe, job)
    return images


CPU_PROFILES = {
    "bf16 resident": ("vram_24", True, {}),
    "fp8 storage, bf16 compute": ("vram_12", True, {}),
    "fp8 storage, fp32 compute": ("vram_12", False, {}),
    "block offload, bf16 storage, fp32 compute": ("vram_6", False, {}),
    "leaf offload, bf16 storage, fp32 compute": ("vram_4", False, {}),
    "text encoder on the cpu, no tiling": ("vram_24", True, {"text_encoder": "cpu", "vae_tiling": False}),
}


@pytest.mark.parametrize("case", list(CPU_PROFILES))
def test_apply_profile_runs_the_real_tiny_pipeline_on_cpu(case, tiny_pipe):
    tier, bf16, overrides = CPU_PROFILES[case]
    profile = resolve_profile(tier, bf16, overrides)
    apply_profile(tiny_pipe, profile, "cpu")
    linear = tiny_pipe.transformer.layers[0].feed_forward.w1
    assert linear.weight.dtype == getattr(torch, profile.transformer_storage)
    assert tiny_pipe.vae.use_tiling == profile.vae_tiling and tiny_pipe.vae.use_slicing == profile.vae_slicing
    if profile.vae_tiling:
        assert tiny_pipe.vae.tile_sample_min_size == profile.vae_tile_px
    images = _generate(tiny_pipe, n=2 if profile.max_n > 1 else 1)
    assert images and all(image.startswith(b"\x89PNG") for image in images)


def test_float32_profile_gives_finite_images_from_bf16_storage(tiny_pipe):
    """The no-bf16 path: weights stored in bf16, every layer upcast to float32; the output must be finite."""
    apply_profile(tiny_pipe, default_profile("vram_4", bf16=False), "cpu")
    out = tiny_pipe(prompt="a fox", width=64, height=64, num_inference_steps=2, guidance_scale=0.0, output_type="pt")
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


@pytest.mark.parametrize("weights", ["model_cpu_offload", "sequential_cpu_offload"])
def test_accelerator_only_placements_refuse_the_cpu_with_the_fix(weights, tiny_pipe):
    profile = resolve_profile("vram_24", True, {"weights": weights})
    with pytest.raises(ProfileError, match="needs a CUDA device.*group_offload_block"):
        apply_profile(tiny_pipe, profile, "cpu")


# -- degraded_profile: the same card's out-of-memory retry ----------------------------------------------------------
# (imported here: these tests were appended to the file)

from cluster.memory import predict_peak  # noqa: E402
from cluster.profiles import MIN_DEGRADED_TILE_PX, degraded_profile  # noqa: E402


def test_degraded_profile_tiles_and_slices_with_half_the_tile():
    profile = resolve_profile("vram_12", True, {"vae_tile_px": 1024})
    degraded = degraded_profile(profile)
    assert degraded.vae_tiling and degraded.vae_slicing
    assert degraded.vae_tile_px == profile.vae_tile_px // 2
    assert degraded.name != profile.name
    assert degraded.weights == profile.weights and degraded.max_n == profile.max_n


@pytest.mark.parametrize("overrides", [{"vae_tiling": False}, {"vae_slicing": False}, {"vae_tiling": False,
                                                                                        "vae_slicing": False}])
def test_degraded_profile_turns_on_what_was_off(overrides):
    profile = resolve_profile("vram_24", True, overrides)
    degraded = degraded_profile(profile)
    assert degraded.vae_tiling and degraded.vae_slicing
    assert degraded.vae_tile_px <= profile.vae_tile_px


def test_degraded_tiles_never_go_below_the_minimum_and_then_nothing_is_left():
    profile, tiles = resolve_profile("vram_24", True, {"vae_tile_px": 1984}), []
    while (profile := degraded_profile(profile)) is not None:
        assert len(tiles) < 10, tiles
        tiles.append(profile.vae_tile_px)
    assert tiles == sorted(tiles, reverse=True) and len(set(tiles)) == len(tiles)
    assert min(tiles) == MIN_DEGRADED_TILE_PX
    assert tiles[-2] // 2 < MIN_DEGRADED_TILE_PX  # halving again would have gone below it


def test_nothing_left_to_degrade_at_the_smallest_tile_tiled_and_sliced():
    smallest = resolve_profile("vram_4", False, {"vae_tile_px": MIN_DEGRADED_TILE_PX})
    assert degraded_profile(smallest) is None
    for off in ("vae_tiling", "vae_slicing"):
        degraded = degraded_profile(resolve_profile("vram_4", False, {"vae_tile_px": MIN_DEGRADED_TILE_PX, off: False}))
        assert degraded is not None and getattr(degraded, off)


@pytest.mark.parametrize("overrides", [
    {"vae_tiling": False},
    {"vae_tiling": False, "vae_slicing": False},
    {"vae_tile_px": 2048},
], ids=["untiled", "untiled unsliced", "tile as large as the image"])
def test_degraded_profile_lowers_the_peak_of_a_decode_bound_request(overrides):
    profile = resolve_profile("vram_24", True, {"max_n": 2, **overrides})
    before = predict_peak(2048, 2048, 2, profile)
    assert before.phase == "decode"
    after = predict_peak(2048, 2048, 2, degraded_profile(profile))
    assert after.vae < before.vae and after.total < before.total
