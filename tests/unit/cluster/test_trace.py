"""The fake-tensor tracer (cluster/trace.py): its counter on small modules where the live bytes are known exactly,
and the full-size Z-Image-Turbo's phases, whose peaks must scale as the architecture says (image tokens, the
guided and batched latents, the dtype, VAE tiles and slices) and stay near the figure measured before."""

import pytest

from cluster import trace
from cluster.memory import GIB, load_calibration

MIB = 1 << 20
CAL = load_calibration()


# -- the counter, on small modules --------------------------------------------------------------------------------

def _embedding(vocab: int):
    import torch

    return lambda: torch.nn.Embedding(vocab, 64)


def _lookup(tokens: int):
    import torch

    return lambda module: module(torch.zeros(1, tokens, dtype=torch.int64))


def test_parameters_do_not_count_and_a_lookup_counts_its_ids_and_rows_exactly():
    """Ten times the weights, the same activations: the ids (int64) and the rows looked up (float32), no more."""
    small = trace.trace_module(_embedding(1000), _lookup(32))
    large = trace.trace_module(_embedding(10_000), _lookup(32))
    assert small.peak_bytes == large.peak_bytes == 32 * 8 + 32 * 64 * 4
    assert small.weight_copies_bytes == 0


def test_dead_tensors_are_freed_and_views_are_free():
    """x, x+1, x+2 at once (3 buffers); a view adds nothing; dropping a result frees it before the next one."""
    import torch

    def run(_module):
        x = torch.empty(1024, dtype=torch.float32)  # 4 KiB
        y = x + 1
        y = y + 1  # the first y dies after this add: 3 buffers at the add, 2 after
        v = y.view(32, 32).t()  # a view: nothing new
        z = y + v.reshape(-1)  # reshape of a transposed view copies: 4 buffers at the add
        return z

    traced = trace.trace_module(torch.nn.Identity, run)
    assert traced.peak_bytes == 4 * 4096


def test_attention_is_counted_as_cuda_fused_kernels_hold_it_not_as_the_math_matrix():
    """Flash: q, k, v, the output and a float32 logsumexp; math: the (heads x seq x seq) matrix too."""
    import torch
    import torch.nn.functional as F

    b, h, s, d = 1, 8, 1024, 64

    def run(_module):
        q, k, v = (torch.empty(b, s, h, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        return F.scaled_dot_product_attention(q, k, v)

    qkv = 3 * b * h * s * d * 2
    fused = trace.trace_module(torch.nn.Identity, run, compute_dtype="bfloat16")
    math = trace.trace_module(torch.nn.Identity, run, compute_dtype="bfloat16", attention="math")
    assert fused.peak_bytes == pytest.approx(qkv + b * h * s * d * 2 + b * h * s * 4, abs=64)  # + RNG state
    assert math.peak_bytes >= qkv + b * h * s * s * 2
    assert any("flash" in note for note in fused.notes)


def test_cuda_block_rounding():
    assert trace.cuda_block_bytes(0) == 0
    assert trace.cuda_block_bytes(1) == 512
    assert trace.cuda_block_bytes(5 * MIB + 1) == 5 * MIB + 512  # split from a 20 MiB segment
    assert trace.cuda_block_bytes(11 * MIB) == 12 * MIB  # a 12 MiB segment; the 1 MiB left is not split off
    assert trace.cuda_block_bytes(13 * MIB + 512) == 14 * MIB
    assert trace.cuda_block_bytes(12 * MIB + 512) == 12 * MIB + 512  # a 14 MiB segment: the 2 MiB left is split off


# -- the full-size model ------------------------------------------------------------------------------------------

def test_the_traced_modules_are_the_full_size_architecture():
    """Parameter counts as the shipped calibration has them (cluster/calibrate.py's full-size pipeline)."""
    def count(component):
        return sum(p.numel() for p in trace.fake_component(component).module.parameters())

    assert count("transformer") == CAL.transformer_params
    assert count("text_encoder") == CAL.text_encoder_params
    assert count("vae") == CAL.vae_params


def _step(side: int, **kwargs) -> int:
    return trace.trace_transformer_step(side, side, **kwargs).peak_bytes


def test_transformer_step_at_1024_is_near_the_measured_half_gib():
    """A previous experiment found ~0.52 GiB of live activations (134 KiB per image token) for the bf16 transformer
    at 1024x1024, n=1, 512 prompt tokens. The trace runs the same forward plus the pipeline's latents and prompt
    embeddings (~4 MiB): within 0.45-0.60 GiB. Below: the last FFN's four (4608 x 10240) bf16 tensors alone are
    0.35 GiB; above: one materialised (30 x 4608 x 4608) attention matrix would add 1.2 GiB in bf16."""
    traced = trace.trace_transformer_step(1024, 1024)
    assert 0.45 * GIB < traced.peak_bytes < 0.60 * GIB
    assert traced.peak_bytes < CAL.transformer_params * 2 / 20  # parameters (11.5 GiB in bf16) are not counted
    assert traced.weight_copies_bytes == 0 and traced.phase == "denoise"
    assert any("flash" in note for note in traced.notes)


def test_transformer_peak_grows_with_tokens_guidance_batch_and_dtype():
    one = _step(1024)
    assert _step(512) < one / 2 < _step(1024, prompt_tokens=64)  # 1024 image tokens + 512 vs 4096 + 512
    assert _step(1024, prompt_tokens=64) < one
    # Guidance runs 2n latents: twice the batch, twice the peak (the part that does not grow with the batch is small).
    assert _step(1024, cfg=True) == pytest.approx(2 * one, rel=0.02)
    assert _step(1024, n=2) == pytest.approx(2 * one, rel=0.02)
    assert _step(1024, n=2, cfg=True) == pytest.approx(4 * one, rel=0.02)
    assert _step(1024, compute_dtype="float32") == pytest.approx(2 * one, rel=0.03)


def test_transformer_with_layerwise_casting_counts_the_upcast_copies_apart():
    """fp8 storage, bf16 compute: the activations are those of bf16; the hooks' upcast copies peak at one leaf's
    weights in bf16 (the largest leaf: a 3840 x 10240 FFN projection, 75 MiB)."""
    cast = trace.trace_transformer_step(1024, 1024, storage_dtype="float8_e4m3fn")
    assert cast.peak_bytes == _step(1024)
    assert cast.weight_copies_bytes == CAL.transformer_leaf_params * 2
    assert any("layerwise casting" in note for note in cast.notes)


def test_text_encoder_peak_and_its_dtype():
    """bf16 on 512 tokens: the 37 hidden states it keeps (output_hidden_states, 2.5 MiB each), the KV cache
    transformers fills (36 layers x keys and values x 1 MiB), the MLP's (512 x 9728) tensors: 0.1-0.3 GiB. Float32:
    twice that."""
    bf16 = trace.trace_text_encoder("bfloat16")
    assert 0.1 * GIB < bf16.peak_bytes < 0.3 * GIB
    assert trace.trace_text_encoder("float32").peak_bytes == pytest.approx(2 * bf16.peak_bytes, rel=0.03)
    assert any("nonzero" in note for note in bf16.notes)  # the boolean-mask indexing it bounds


def test_vae_tiles_and_slices_cap_the_decode():
    untiled = trace.trace_vae_decode(2048, 2048, tiling=False).peak_bytes
    tiled = trace.trace_vae_decode(2048, 2048, tiling=True, tile_px=512).peak_bytes
    assert untiled > 4 * GIB  # 256 channels at 2048x2048 in bf16 are 2 GiB a tensor
    assert tiled < untiled / 8
    one = trace.trace_vae_decode(1024, 1024, n=1, tiling=False).peak_bytes
    sliced = trace.trace_vae_decode(1024, 1024, n=4, tiling=False, slicing=True).peak_bytes
    batched = trace.trace_vae_decode(1024, 1024, n=4, tiling=False, slicing=False).peak_bytes
    assert one < sliced < 1.1 * one  # the decoded images are kept: 4 x 24 MiB, small beside one decode
    assert batched == pytest.approx(4 * one, rel=0.02)
    # one tile covering the image is the untiled decode
    assert trace.trace_vae_decode(1024, 1024, tiling=True, tile_px=1024).peak_bytes == one
