"""The memory model (cluster/memory.py): hand-computed cells, monotonicity, tiling, offload phases, calibration."""

import json

import pytest

from cluster.memory import (
    GIB,
    ZIT_CALIBRATION_FILE_ENV,
    fit_calibration,
    fits,
    largest_batch,
    largest_square,
    load_calibration,
    predict_peak,
    predict_phases,
    uses_cfg,
)
from cluster.profiles import default_profile, resolve_profile
from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes

# The shipped default's numbers, copied by hand from cluster/calibration/default.json for the hand-computed cells.
T_PARAMS = 6_154_908_736
T_LEAF = 39_321_600
TE_EMBED = 388_956_160
TE_LAYER = 100_930_816
TE_LEAF = 24_903_680
VAE = 83_819_683
ACT_PER_TOKEN = 196_608
ACT_BASE = 67_108_864
TE_ACT = 206_967_040  # raised to the fake-tensor trace's bound (default.json term_sources)
VAE_PER_PX = 2560
VAE_OUT_PER_PX = 12
CONTEXT = 536_870_912
MARGIN_MIN = 268_435_456


@pytest.fixture(scope="module")
def cal():
    return load_calibration()


def test_vram_24_at_1024_peaks_in_the_decode_as_computed_by_hand(cal):
    est = predict_peak(1024, 1024, 1, default_profile("vram_24", bf16=True), cal)
    weights = T_PARAMS * 2  # resident bf16
    vae = VAE * 2 + VAE_PER_PX * 1024 * 1024 + VAE_OUT_PER_PX * 1024 * 1024  # one 1024 tile, sliced
    subtotal = weights + vae + CONTEXT
    assert est.phase == "decode"
    assert (est.weights, est.activations, est.vae, est.text_encoder) == (weights, 0, vae, 0)
    assert est.margin == int(0.05 * subtotal)
    assert est.total == subtotal + int(0.05 * subtotal)
    assert round(est.total / GIB, 2) == 15.36


def test_vram_4_without_bf16_at_512_peaks_while_encoding_the_prompt(cal):
    """Leaf offload leaves the transformer off the card while the offloaded Qwen3 runs in float32 from bf16."""
    est = predict_peak(512, 512, 1, default_profile("vram_4", bf16=False), cal)
    text_encoder = TE_EMBED * 4 + 2 * TE_LAYER * 2 + TE_LEAF * 4 + TE_ACT * 2
    assert est.phase == "encode"
    assert (est.weights, est.activations, est.text_encoder, est.vae) == (0, 0, text_encoder, VAE * 4)
    assert est.margin == MARGIN_MIN  # 5 % of 3.0 GiB is below the floor
    assert est.total == text_encoder + VAE * 4 + CONTEXT + MARGIN_MIN


def test_denoise_phase_of_leaf_offload_by_hand(cal):
    phases = predict_phases(512, 512, 1, default_profile("vram_4", bf16=False), cal)
    denoise = phases["denoise"]
    assert denoise.weights == 2 * T_LEAF * 2 + T_LEAF * 4  # two bf16 leaves in flight + one float32 upcast
    assert denoise.activations == (ACT_BASE + ACT_PER_TOKEN * (32 * 32 + 512)) * 2


ALL_PROFILES = [default_profile(t, bf16) for t in VRAM_TIERS_GIB for bf16 in (True, False)]


@pytest.mark.parametrize("profile", ALL_PROFILES, ids=lambda p: p.name)
def test_peak_never_decreases_with_pixels_or_n(profile, cal):
    sides = range(64, 2049, 64)
    for n in (1, 2, 4):
        totals = [predict_peak(s, s, n, profile, cal).total for s in sides]
        assert totals == sorted(totals)
    for side in (512, 1024, 2048):
        totals = [predict_peak(side, side, n, profile, cal).total for n in range(1, 9)]
        assert totals == sorted(totals)
    assert predict_peak(2048, 2048, 4, profile, cal).total > predict_peak(512, 512, 1, profile, cal).total


def test_tiling_caps_the_vae_decode_term(cal):
    tiled = resolve_profile("vram_24", True, {"vae_tile_px": 512})
    untiled = resolve_profile("vram_24", True, {"vae_tiling": False})
    decode = lambda p, s: predict_phases(s, s, 1, p, cal)["decode"].vae  # noqa: E731
    # Above one tile only the small per-pixel output buffer grows; without tiling the whole decode does.
    assert decode(tiled, 2048) - decode(tiled, 512) == VAE_OUT_PER_PX * (2048**2 - 512**2)
    assert decode(untiled, 2048) - decode(untiled, 512) == (VAE_PER_PX + VAE_OUT_PER_PX) * (2048**2 - 512**2)


def test_slicing_decodes_one_image_at_a_time(cal):
    sliced = default_profile("vram_24", True)
    batched = resolve_profile("vram_24", True, {"vae_slicing": False})
    decode = lambda p, n: predict_phases(1024, 1024, n, p, cal)["decode"].vae  # noqa: E731
    assert decode(sliced, 4) - decode(sliced, 1) == 3 * VAE_OUT_PER_PX * 1024 * 1024
    assert decode(batched, 4) - decode(batched, 1) == 3 * (VAE_PER_PX + VAE_OUT_PER_PX) * 1024 * 1024


def test_model_cpu_offload_peak_is_a_max_over_components_not_a_sum(cal):
    """With model CPU offload the transformer and the text encoder are never on the card together."""
    profile = resolve_profile("vram_24", True, {"weights": "model_cpu_offload"})
    est = predict_peak(512, 512, 1, profile, cal)
    phases = predict_phases(512, 512, 1, profile, cal)
    assert phases["denoise"].text_encoder == 0 and phases["encode"].weights == 0
    assert est.weights + est.text_encoder < T_PARAMS * 2 + TE_EMBED * 2  # not both full components
    assert est.phase == "denoise" and est.weights == T_PARAMS * 2


def test_fp8_storage_halves_the_resident_transformer(cal):
    bf16 = predict_phases(512, 512, 1, default_profile("vram_24", True), cal)["denoise"].weights
    fp8 = predict_phases(512, 512, 1, default_profile("vram_12", True), cal)["denoise"].weights
    assert bf16 == T_PARAMS * 2
    assert fp8 == T_PARAMS * 1 + T_LEAF * 2  # fp8 storage plus one layer upcast to bf16


def test_largest_square_and_batch_sit_on_the_fit_boundary(cal):
    for profile in ALL_PROFILES:
        tier = profile.name.split("-")[0]
        budget = tier_vram_bytes(tier)
        side = largest_square(profile, budget, 1, cal)
        assert side % 16 == 0 and fits(side, side, 1, profile, budget, cal) is None
        if side < 2048:
            assert fits(side + 16, side + 16, 1, profile, budget, cal) is not None
        n = largest_batch(512, 512, profile, budget, cal)
        assert 1 <= n <= profile.max_n
        if n < profile.max_n:
            assert fits(512, 512, n + 1, profile, budget, cal) is not None


def test_nothing_fits_a_card_too_small(cal):
    profile = default_profile("vram_24", True)
    assert largest_square(profile, 8 * GIB, 1, cal) == 0
    assert largest_batch(512, 512, profile, 8 * GIB, cal) == 0
    reason = fits(512, 512, 1, profile, 8 * GIB, cal)
    assert "predicted peak" in reason and "8.00 GiB budget" in reason and "weights" in reason


def test_per_process_cap_lowers_the_budget(cal):
    capped = resolve_profile("vram_24", True, {"max_memory_gb": 10})
    assert fits(512, 512, 1, default_profile("vram_24", True), 24 * GIB, cal) is None
    assert "10.00 GiB budget" in fits(512, 512, 1, capped, 24 * GIB, cal)


def test_limits_of_the_profile_come_first(cal):
    profile = default_profile("vram_4", False)
    assert "max_n 1" in fits(512, 512, 2, profile, 4 * GIB, cal)
    small = resolve_profile("vram_24", True, {"max_pixels": 512 * 512})
    assert "max_pixels" in fits(1024, 1024, 1, small, 24 * GIB, cal)


def test_calibration_file_from_the_environment(tmp_path, monkeypatch, cal):
    data = json.loads(cal.model_dump_json())
    data["context_bytes"] = cal.context_bytes + GIB
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv(ZIT_CALIBRATION_FILE_ENV, str(path))
    profile = default_profile("vram_12", True)
    assert predict_peak(512, 512, 1, profile).context == predict_peak(512, 512, 1, profile, cal).context + GIB


def test_a_bad_calibration_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"source": "guess"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_calibration(bad)
    with pytest.raises(ValueError, match="not found"):
        load_calibration(tmp_path / "missing.json")


def test_fit_recovers_the_coefficients_of_synthetic_measurements(cal):
    """Records made from known coefficients (different from the default) are fitted back to those coefficients."""
    truth = cal.model_copy(update={"activation_bytes_per_token": 150_000.0, "vae_decode_bytes_per_pixel": 3000.0,
                                   "vae_output_bytes_per_pixel": 12.0})
    records = []
    for tier, bf16 in (("vram_24", True), ("vram_8", True), ("vram_4", False)):
        profile = default_profile(tier, bf16)
        for side, n in ((256, 1), (512, 1), (768, 1), (512, 2) if profile.max_n > 1 else (384, 1)):
            phases = predict_phases(side, side, n, profile, truth)
            rest = 100 * 2**20
            records.append({
                "profile": profile.model_dump(), "width": side, "height": side, "n": n, "rest_bytes": rest,
                "denoise_peak_bytes": rest + phases["denoise"].activations + 7 * 2**20,
                "decode_peak_bytes": rest + phases["decode"].vae,
                "reserved_peak_bytes": rest + phases["decode"].total, "context_bytes": 400 * 2**20,
            })
    fitted = fit_calibration(records, cal, card="test card")
    assert fitted.source == "measured" and fitted.card == "test card"
    assert fitted.activation_bytes_per_token == pytest.approx(150_000.0, rel=1e-6)
    assert fitted.vae_decode_bytes_per_pixel == pytest.approx(3000.0, rel=1e-6)
    assert fitted.context_bytes == 400 * 2**20
    assert fitted.fit["runs"] == len(records)


def test_fit_needs_two_sizes(cal):
    record = {"profile": default_profile("vram_24", True).model_dump(), "width": 512, "height": 512, "n": 1,
              "rest_bytes": 0, "denoise_peak_bytes": 1, "decode_peak_bytes": 1}
    with pytest.raises(ValueError, match="two or more sizes"):
        fit_calibration([record], cal)


def test_lora_adapters_count_with_the_resident_weights_in_the_compute_dtype(cal):
    plain = default_profile("vram_12", True)
    with_lora = plain.model_copy(update={"lora_params": 50_000_000})
    for phase, estimate in predict_phases(1024, 1024, 1, with_lora, cal).items():
        assert estimate.weights - predict_phases(1024, 1024, 1, plain, cal)[phase].weights == 50_000_000 * 2
    assert largest_square(with_lora, tier_vram_bytes("vram_12"), 1, cal) <= largest_square(
        plain, tier_vram_bytes("vram_12"), 1, cal)
    # A 4 GB card offloads the transformer: its adapters travel with the offloaded groups, nothing stays resident.
    small = default_profile("vram_4", False)
    assert predict_peak(512, 512, 1, small.model_copy(update={"lora_params": 50_000_000}), cal).weights == \
        predict_peak(512, 512, 1, small, cal).weights


# -- classifier-free guidance ----------------------------------------------------------------------------------------


def test_guidance_doubles_the_transformer_activations_at_vram_24_2048_as_computed_by_hand(cal):
    """2048x2048 on the 24 GB profile peaks while denoising, guided or not; guidance adds one more image's worth of
    per-token activations (the negative-prompt twin, with its own prompt tokens) and nothing else."""
    profile = default_profile("vram_24", bf16=True)
    tokens = 128 * 128 + 512  # image tokens of 2048x2048, plus the padded prompt
    weights, vae_rest = T_PARAMS * 2, VAE * 2  # resident bf16 transformer; the VAE waits on the card
    plain = predict_peak(2048, 2048, 1, profile, cal)
    guided = predict_peak(2048, 2048, 1, profile, cal, cfg=True)
    assert plain.phase == guided.phase == "denoise"
    assert plain.activations == ACT_BASE + ACT_PER_TOKEN * tokens
    assert guided.activations == ACT_BASE + 2 * ACT_PER_TOKEN * tokens  # the base is paid once
    assert guided.activations - plain.activations == ACT_PER_TOKEN * tokens
    assert (guided.weights, guided.vae, guided.text_encoder, guided.context) == (weights, vae_rest, 0, CONTEXT)
    subtotal = weights + guided.activations + vae_rest + CONTEXT
    assert guided.margin == int(0.05 * subtotal) and guided.total == subtotal + int(0.05 * subtotal)
    assert guided.total - plain.total == ACT_PER_TOKEN * tokens + guided.margin - plain.margin
    assert round(guided.total / GIB, 2) == 19.29


@pytest.mark.parametrize("profile", ALL_PROFILES, ids=lambda p: p.name)
def test_guidance_changes_only_the_denoise_activations(profile, cal):
    """The negative prompt is encoded by a second call after the first ended and decoding sees n images: encode and
    decode are as without guidance; the denoise activations are those of 2n unguided images."""
    for side, n in ((512, 1), (1024, 2), (2048, 1)):
        plain = predict_phases(side, side, n, profile, cal)
        guided = predict_phases(side, side, n, profile, cal, cfg=True)
        assert guided["encode"] == plain["encode"] and guided["decode"] == plain["decode"]
        assert guided["denoise"].activations == predict_phases(side, side, 2 * n, profile, cal)["denoise"].activations
        assert guided["denoise"].weights == plain["denoise"].weights
        guided_peak = predict_peak(side, side, n, profile, cal, cfg=True)
        assert guided_peak.total >= predict_peak(side, side, n, profile, cal).total


def test_guided_requests_fit_smaller_and_say_so(cal):
    profile = default_profile("vram_4", bf16=False)
    budget = tier_vram_bytes("vram_4")
    plain, guided = largest_square(profile, budget, 1, cal), largest_square(profile, budget, 1, cal, cfg=True)
    assert 0 < guided < plain
    assert fits(guided, guided, 1, profile, budget, cal, cfg=True) is None
    reason = fits(guided + 16, guided + 16, 1, profile, budget, cal, cfg=True)
    assert "classifier-free guidance" in reason and "activations" in reason
    assert fits(guided + 16, guided + 16, 1, profile, budget, cal) is None  # the same image unguided fits
    vram_12 = default_profile("vram_12", bf16=True)
    assert largest_batch(1024, 1024, vram_12, tier_vram_bytes("vram_12"), cal, cfg=True) < largest_batch(
        1024, 1024, vram_12, tier_vram_bytes("vram_12"), cal)


def test_guidance_is_on_above_zero_as_in_diffusers():
    assert not uses_cfg(0.0) and uses_cfg(0.5) and uses_cfg(20.0)


def test_the_transformer_runs_the_prompts_real_tokens_padded_to_32_and_512_is_the_bound():
    from cluster.memory import for_prompt, transformer_prompt_tokens
    from cluster.speed import encode_seconds, predict_seconds

    cal = load_calibration()
    assert cal.prompt_tokens == 512
    assert [transformer_prompt_tokens(t, cal) for t in (None, 0, 1, 32, 33, 300, 512, 900)] == [
        512, 32, 32, 32, 64, 320, 512, 512]
    assert for_prompt(cal, None) is cal and for_prompt(cal, 600) is cal
    short = for_prompt(cal, 10)
    profile = default_profile("vram_12", True)
    from cluster.memory import predict_phases

    assert predict_phases(1024, 1024, 1, profile, short)["denoise"].activations < predict_phases(
        1024, 1024, 1, profile, cal)["denoise"].activations
    assert predict_seconds(1024, 1024, 1, 9, profile, 1.0, short).denoise_s < predict_seconds(
        1024, 1024, 1, 9, profile, 1.0, cal).denoise_s
    # The encoder itself always runs on the padded 512 tokens.
    offload = profile.model_copy(update={"text_encoder": "offload"})
    assert encode_seconds(offload, 1.0, short) == encode_seconds(offload, 1.0, cal)


def test_fit_counts_the_prompt_tokens_each_run_recorded(cal):
    """Calibration runs use a short prompt: made with 64 transformer prompt tokens and recorded as such, the records
    fit back to the true per-token bytes; the same records read as 512 tokens would not."""
    from cluster.memory import for_prompt

    truth = for_prompt(cal.model_copy(update={"activation_bytes_per_token": 150_000.0}), 40)
    assert truth.prompt_tokens == 64
    records = []
    profile = default_profile("vram_24", True)
    for side, n in ((256, 1), (512, 1), (768, 1), (512, 2)):
        phases = predict_phases(side, side, n, profile, truth)
        records.append({"profile": profile.model_dump(), "width": side, "height": side, "n": n, "rest_bytes": 0,
                        "denoise_peak_bytes": phases["denoise"].activations, "decode_peak_bytes": phases["decode"].vae,
                        "prompt_tokens": 40})
    assert fit_calibration(records, cal).activation_bytes_per_token == pytest.approx(150_000.0, rel=1e-6)
    for r in records:
        del r["prompt_tokens"]
    assert fit_calibration(records, cal).activation_bytes_per_token < 140_000.0
