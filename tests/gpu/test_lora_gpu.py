"""LoRA on a real CUDA card under every tier profile (fp8 storage, group offload, ...): the tiny model with one of
its adapters loads, runs, gives finite images that differ from the base model's. Skipped where CUDA is absent."""

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]


@pytest.mark.parametrize("tier", ["vram_4", "vram_6", "vram_8", "vram_12", "vram_24"])
def test_an_adapter_runs_under_the_tier_profile(tiny_model_dir, tier):
    from cluster.pipeline import load_pipeline, models_dir
    from cluster.profiles import apply_profile, default_profile
    from cluster.tiny_model import ensure_tiny_loras
    from deployments.lora import adapter_to_dtype

    profile = default_profile(tier, torch.cuda.get_device_capability() >= (8, 0))
    pipe = load_pipeline(tiny_model_dir, "cpu")
    apply_profile(pipe, profile, "cuda")
    folder = ensure_tiny_loras(models_dir(), tiny_model_dir)

    def image():
        generator = torch.Generator("cpu").manual_seed(5)
        out = pipe(prompt="a fox", height=256, width=256, num_inference_steps=2, guidance_scale=0.0,
                   generator=[generator], output_type="np")
        return out.images[0]

    base = image()
    pipe.load_lora_weights(str(folder), weight_name="tiny-ink.safetensors", adapter_name="tiny-ink")
    adapter_to_dtype(pipe, "tiny-ink", getattr(torch, profile.compute_dtype))
    styled = image()
    assert np.isfinite(styled).all()
    assert np.abs(styled - base).mean() > 1e-3
