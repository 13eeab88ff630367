"""Every tier profile on a real CUDA card with the tiny model: it runs, gives finite images, and the memory model,
calibrated for the tiny architecture, predicts the measured peaks.

Why a calibration of its own: the shipped one describes the 6 B-parameter model, whose weights and activations are
thousands of times the tiny model's, so comparing tiny measurements with it would test nothing. Instead:
1. the tiny model's parameter counts are read from the loaded pipeline (exact, as `zit calibrate` does);
2. the activation and VAE coefficients are fitted (cluster.memory.fit_calibration, the same code as `zit calibrate`)
   on the bf16 profiles' runs only;
3. the float32 profiles are held out: their predicted peaks must cover what they measure (the model's dtype scaling
   and offload terms are what is tested) without being wildly above it;
4. the weights at rest (allocated before a call) must match the predicted resident weights of each placement.
Runs only where CUDA exists; skipped elsewhere.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]

MIB = 1 << 20
SIZES = ((256, 1), (512, 1), (768, 1), (512, 2))


@pytest.fixture(scope="module")
def runs(tiny_model_dir):
    from cluster.calibrate import measure_run
    from cluster.memory import architecture_of, load_calibration
    from cluster.pipeline import load_pipeline
    from cluster.profiles import apply_profile, default_profile, resolve_profile
    from cluster.tiers import VRAM_TIERS_GIB

    profiles = [default_profile(t, bf16) for t in VRAM_TIERS_GIB for bf16 in (True, False)]
    profiles += [resolve_profile("vram_24", True, {"weights": w, "name": w})
                 for w in ("model_cpu_offload", "sequential_cpu_offload")]
    records = []
    for profile in profiles:
        pipe = load_pipeline(tiny_model_dir, "cpu")
        apply_profile(pipe, profile, "cuda")
        for side, n in SIZES:
            if n <= profile.max_n:
                records.append(measure_run(pipe, profile, side, side, n, 2, "cuda"))
        del pipe
        torch.cuda.empty_cache()
    base = load_calibration().model_copy(
        update={**architecture_of(load_pipeline(tiny_model_dir, "cpu")), "architecture": "tiny"})
    return records, base


def test_every_profile_runs_without_oom_and_gives_finite_images(runs):
    records, _ = runs
    bad = [(r["profile"]["name"], r["width"], r.get("error")) for r in records if r.get("oom") or not r["finite"]]
    assert not bad


def test_held_out_float32_profiles_are_predicted(runs):
    from cluster.memory import fit_calibration, predict_peak
    from cluster.profiles import Profile

    records, base = runs
    train = [r for r in records if r["profile"]["compute_dtype"] == "bfloat16"]
    test = [r for r in records if r["profile"]["compute_dtype"] == "float32"]
    cal = fit_calibration(train, base)
    for r in test:
        est = predict_peak(r["width"], r["height"], r["n"], Profile.model_validate(r["profile"]), cal)
        measured = r["reserved_peak_bytes"] + cal.context_bytes
        label = f"{r['profile']['name']} {r['width']} n={r['n']}"
        assert est.total >= measured, f"{label}: predicted {est.total / MIB:.0f} MiB < measured {measured / MIB:.0f}"
        assert est.total <= 2 * measured + 256 * MIB, f"{label}: predicted {est.total / MIB:.0f} MiB, far above"


def test_resident_weights_match_the_placement(runs):
    from cluster.memory import predict_phases
    from cluster.profiles import Profile

    records, base = runs
    for r in records:
        profile = Profile.model_validate(r["profile"])
        phases = predict_phases(r["width"], r["height"], r["n"], profile, base)
        at_rest = phases["decode"].weights + phases["decode"].text_encoder + base.vae_params * (
            4 if profile.compute_dtype == "float32" else 2) * (profile.weights not in ("model_cpu_offload",
                                                                                      "sequential_cpu_offload"))
        # allocator blocks round each tensor up to 512 bytes: allow that per tensor plus 2 MiB
        assert abs(r["rest_bytes"] - at_rest) <= 0.1 * at_rest + 2 * MIB, (profile.name, r["rest_bytes"], at_rest)
