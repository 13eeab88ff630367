"""Peak bytes of live activations of the full-size Z-Image-Turbo, per pipeline phase, traced on the CPU without
weights: a lower bound of what CUDA must hold beside the weights (`zit calibrate --trace`, cluster/calibrate.py).

API: `trace_text_encoder`, `trace_transformer_step`, `trace_vae_decode` return a `Traced` (peak live activation
bytes, peak of layerwise casting's weight copies, the allocator's rounding at the peak, wall time of the trace, notes).
`fake_component` builds (and caches) a fake full-size component; `trace_module` traces any module on fake tensors;
`breakdown` lists the tensors live at a trace's peak. The whole `zit calibrate --trace` grid (cluster/calibrate.py
trace_jobs: 148 cells, 5 sides x n 1/2/4 x guidance x bf16/fp32, the VAE untiled and at 3 tiles, sliced or not)
traces in 3 to 3.5 minutes on a 2-core CPU (about 1.2 s a transformer step; building a component: a few seconds,
once). Sanity: the bf16 transformer step at 1024x1024, n=1, 512 prompt tokens peaks at 537 MiB (0.525 GiB, 134 KiB
per image token), as a previous measurement of that forward with real tensors found (~0.52 GiB); the trace adds the
pipeline's float32 latents, their bf16 cast and the prompt embeddings (~4 MiB). The peak is in the last FFN: its
two (4608 x 10240) projections, their SiLU and product (90 MiB each), beside the residual stream.

Method
------
Each component is built with the REAL full-size architecture (the configs of cluster/calibrate.py
`full_size_pipeline_factory`: ZImageTransformer2DModel's defaults, the 36-layer Qwen3 text encoder, the 16-channel
AutoencoderKL) on the meta device, and its parameters and buffers are replaced by fake tensors
(torch._subclasses.fake_tensor.FakeTensorMode: shape, dtype and strides, no data), once per (component, compute dtype,
storage dtype) (`functools.cache`). A phase is then run exactly as diffusers' ZImagePipeline.__call__ runs it
(the code of `_encode_prompt`, of one iteration of the denoising loop, and of the decode at its end is mirrored line by
line below), under a small TorchDispatchMode, `_LiveBytes`, that sees every aten op after autograd and the composite
decompositions (what CUDA's eager mode runs too) and keeps the bytes of every live storage:

* a storage is counted from the op that allocates it: an op output whose storage is neither already known nor one of
  the op's inputs' storages (so views, in-place and out= results never count twice, and a view of a tensor made before
  the trace, a parameter or the RoPE table the transformer caches, never counts);
* it stops counting when it dies: a weakref callback on the storage object (PyTorch keeps one Python object per live
  storage), i.e. when the last tensor using it is dropped, as CUDA's caching allocator gets the block back;
* the peak is taken after each op's outputs are allocated, while its inputs are still alive (as on the GPU);
* parameters and buffers are registered before the trace and never counted (`peak_bytes` is activations only);
* with layerwise casting (`storage_dtype`), diffusers' hooks upcast each leaf's weights to the compute dtype before
  its forward and cast them back after: a dtype conversion (aten._to_copy) of a parameter storage is a weight copy,
  counted in `weight_copies_bytes` (its own peak) when it has the compute dtype and not at all when it has the storage
  dtype (it replaces the stored tensor the hook dropped), never in `peak_bytes`. The peak of both together is in
  the notes;
* two shortcuts keep the fake modules fast and runnable, with the same allocations: diffusers' casting hooks cast
  each leaf's tensors with Tensor.to and put them in place (`_fake_safe_casting_hooks`: Module.to must swap fake
  parameters, which torch refuses for tensors the fake-tensor converter holds weak references to), and the tiled
  VAE decode's row-by-row in-place blend does its first row only (`_one_row_blends`: the other rows repeat the same
  row-sized temporaries);
* `rounding_bytes`: what CUDA's caching allocator adds to the storages live at the activation peak (each block
  rounded up to 512 B; a request of 10 MiB or more gets a new segment rounded to 2 MiB, kept whole when the
  remainder is 1 MiB or less, as the allocator does not split it); an estimate, the allocator may also reuse larger
  cached blocks.

Tool
----
torch.distributed._tools.mem_tracker.MemTracker was evaluated first: under FakeTensorMode on this CPU it runs the
transformer and its 'Activation' peak agrees with this counter (0.524 GiB at 1024x1024, bf16, 512 prompt tokens),
but it was not chosen: it is a private API under torch.distributed (DTensor import), it needs parameters that
require grad (it hooks their gradients), it updates every tracked module's snapshot after every op (about 5x slower:
7.5 s against 1.4 s for that forward, too slow for the grid), it cannot tell the casting hooks' weight copies from
activations (both are op outputs inside the forward), and it does not give the live blocks at the peak needed for
the allocator's rounding. torch.cuda.memory's tools need a real CUDA device. The counter here is ~100 lines.

Attention
---------
A fake tensor's device cannot be 'cuda' in this CPU-only torch build (indexing a fake CUDA tensor needs the CUDA
device guard, which is not linked), so the fake tensors are on the CPU, where SDPA would dispatch to the CPU's own
kernels, and a fake CUDA SDPA falls back to the math kernel that materialises the whole (batch, heads, seq, seq)
attention matrix, which CUDA's fused kernels never hold. So `torch.nn.functional.scaled_dot_product_attention`, the
call diffusers' "native" dispatcher backend (the profile's 'sdpa') and transformers' sdpa integration make, is
intercepted (a TorchFunctionMode) and sent to the kernel CUDA's SDPA selects, whose fake (meta) implementation
allocates exactly what the CUDA kernel returns:

* flash (fp16/bf16, no mask, head dim <= 256): aten._scaled_dot_product_flash_attention: the output and the
  logsumexp, (batch, heads, seq) float32;
* else memory-efficient (also fp32, masks; no grouped-query): aten._scaled_dot_product_efficient_attention with no
  logsumexp (inference), a boolean mask first turned into an additive one of its own shape (as SDPA does); when the
  head dim is over 128 in fp16/bf16 (the VAE's 512-channel single head) the kernel also allocates a float32 output
  accumulator of the output's size for the duration of the call, which is counted;
* else the math kernel (aten._scaled_dot_product_attention_math), which materialises the matrix.

`attention='flash'` (flash-attn's kernels) is counted as the flash kernel, 'xformers' as the memory-efficient one,
'math' forces the math kernel (to show what a non-fused path would hold). cuDNN attention, which some torch
versions prefer on Hopper, holds the same output and statistics.

Data-dependent ops
------------------
Fake tensors have no values, so an op whose output shape depends on data cannot run. The phases meet one:
`_encode_prompt`'s `prompt_embeds[i][prompt_masks[i]]` (boolean-mask indexing, aten.nonzero), which keeps the
prompt's real tokens; it is replaced by a copy of the first `tokens` rows, the most that mask can keep (an upper
bound of a tensor of at most 512 x 2560, 2.5 MiB in bf16, made after the encoder's peak). transformers builds the 4D
causal and padding mask without reading the padding mask (it treats a fake tensor as tracing), so the encoder runs
its masked path (memory-efficient kernel) as it does for any prompt shorter than 512 tokens. The transformer's
basic (non-omni) path, the VAE and the pipeline's step code have no data-dependent op. The scheduler's Euler step is
written out (`sample.to(float32) + dt * model_output`), its sigma a scalar.

What is not counted
-------------------
Parameters and buffers (and the transformer's cached RoPE table, 0.3 MiB, made when the module is built); kernel
workspaces other than the memory-efficient attention's accumulator (cuBLAS's, cuDNN's convolution workspaces, flash's
scratch), CUDA's context, allocator fragmentation beyond `rounding_bytes`; temporaries inside one aten kernel; what
other phases keep (the decode phase does not count the prompt embeddings the pipeline still holds, a few MiB).
The prompt embeddings of the denoising step are `prompt_tokens` real tokens each, for every image and, with
guidance, every negative (an upper bound: the pipeline's empty negative prompt has a dozen tokens, which pads to the
same length and adds a mask). So each figure is a LOWER bound of the live bytes CUDA holds for the phase.
"""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# cluster/calibrate.py full_size_pipeline_factory's text encoder (Qwen3-4B) and VAE configs; the transformer is
# ZImageTransformer2DModel's defaults. tests/unit/cluster/test_trace.py checks the parameter counts against the
# shipped calibration's.
TEXT_ENCODER_CONFIG = {
    "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0, "tie_word_embeddings": True,
}
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "sample_size": 1024,
}
CAPTION_DIM = 2560  # the text encoder's hidden size: the transformer's cap_feat_dim
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8  # 2 ** (len(block_out_channels) - 1): the pipeline's vae_scale_factor
MAX_SEQUENCE_LENGTH = 512  # the pipeline's max_sequence_length default (cluster.encoding.MAX_SEQUENCE_LENGTH)

PHASES = ("encode", "denoise", "decode")
ATTENTION = ("sdpa", "flash", "xformers", "math")

# CUDA caching allocator constants (c10/cuda/CUDACachingAllocator.cpp).
_MIN_BLOCK = 512
_SMALL_SIZE = 1 << 20
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20


@dataclass(frozen=True)
class Traced:
    phase: str  # 'encode' | 'denoise' | 'decode'
    peak_bytes: int  # peak live non-parameter bytes
    weight_copies_bytes: int  # peak of upcast weight copies made by layerwise casting hooks (0 if none/unknown)
    seconds: float  # wall time of the trace
    notes: tuple[str, ...]  # ops that could not run fake and how they were bounded, etc.
    rounding_bytes: int = 0  # CUDA caching allocator's rounding of the blocks live at the activation peak (estimate)


def cuda_block_bytes(nbytes: int) -> int:
    """The bytes CUDA's caching allocator holds for a request of `nbytes` served by a fresh segment."""
    if nbytes <= 0:
        return 0
    size = -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK
    if size < _MIN_LARGE_ALLOC:
        return size  # split off a 2 MiB (small) or 20 MiB (large) segment
    segment = -(-size // _ROUND_LARGE) * _ROUND_LARGE
    return segment if segment - size <= _SMALL_SIZE else size


DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2")


def _dtype(name: str | None) -> torch.dtype | None:
    import torch

    if name is None:
        return None
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {name!r}")
    return getattr(torch, name)


# -- the counter ----------------------------------------------------------------------------------------------------

def _live_bytes_mode():
    """The TorchDispatchMode class (built on first use: torch is imported lazily)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    to_copy = torch.ops.aten._to_copy.default

    class _LiveBytes(TorchDispatchMode):
        """Bytes of live storages allocated by ops under it: activations, and weight copies of casting hooks."""

        def __init__(self, weights, compute: torch.dtype, casting: bool, explain: bool = False):
            super().__init__()
            self.compute, self.casting, self.explain = compute, casting, explain
            self.what: dict[int, tuple] = {}  # explain: id(storage) -> (op, shape, dtype)
            self.at_peak: list[tuple] = []  # explain: (bytes, op, shape, dtype) live at the activation peak
            self.known: dict[int, tuple] = {}  # id(storage) -> (weakref, kind, bytes, cuda block bytes)
            self.act = self.act_blocks = self.copies = 0
            self.peak = self.peak_rounding = self.peak_copies = self.peak_both = 0
            self.ops = 0
            for t in weights:
                self._add(t.untyped_storage(), "weight")

        def _add(self, st, kind: str, what: tuple = ()) -> None:
            key = id(st)
            if self.explain:
                self.what[key] = what
            nbytes = st.nbytes()
            blocks = cuda_block_bytes(nbytes)
            self.known[key] = (weakref.ref(st, functools.partial(self._died, key)), kind, nbytes, blocks)
            if kind == "act":
                self.act += nbytes
                self.act_blocks += blocks
                if self.act > self.peak:
                    self.peak, self.peak_rounding = self.act, self.act_blocks - self.act
                    if self.explain:
                        self.at_peak = sorted(((e[2], *self.what.get(k, ())) for k, e in self.known.items()
                                               if e[1] == "act"), key=lambda e: -e[0])
            elif kind == "copy":
                self.copies += nbytes
                self.peak_copies = max(self.peak_copies, self.copies)
            self.peak_both = max(self.peak_both, self.act + self.copies)

        def _died(self, key: int, _ref) -> None:
            entry = self.known.pop(key, None)
            if entry is None:
                return
            _, kind, nbytes, blocks = entry
            self.what.pop(key, None)
            if kind == "act":
                self.act -= nbytes
                self.act_blocks -= blocks
            elif kind == "copy":
                self.copies -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            self.ops += 1
            inputs = None
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                if id(st) in self.known or st.nbytes() == 0:
                    continue
                if inputs is None:
                    inputs = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs))
                              if isinstance(a, torch.Tensor)}
                if id(st) in inputs:
                    continue  # a view or in-place result of a tensor made before the trace
                kind = "act"
                if self.casting and func is to_copy:
                    source = self.known.get(id(args[0].untyped_storage()))
                    if source is not None and source[1] in ("weight", "copy"):
                        kind = "copy" if t.dtype == self.compute else "weight"
                self._add(st, kind, (str(func), tuple(t.shape), str(t.dtype).removeprefix("torch.")) if self.explain
                          else ())
            return out

    return _LiveBytes


# -- attention: the kernel CUDA's SDPA selects ------------------------------------------------------------------------

_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _attention_mode(attention: str):
    """A TorchFunctionMode routing F.scaled_dot_product_attention to the CUDA kernel `attention` stands for."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    aten = torch.ops.aten
    half = (torch.float16, torch.bfloat16)

    def kernel(q, k, v, mask, enable_gqa: bool) -> str:
        if attention == "math":
            return "math"
        gqa = q.shape[-3] != k.shape[-3]
        flash_ok = q.dtype in half and mask is None and q.shape[-1] == v.shape[-1] <= 256 and q.shape[-1] % 8 == 0 \
            and (not gqa or enable_gqa)
        align = 8 if q.dtype in half else 4
        efficient_ok = q.dtype in half + (torch.float32,) and not gqa and q.shape[-1] % align == 0 \
            and v.shape[-1] % align == 0
        if attention == "flash" and flash_ok:
            return "flash"
        if attention == "xformers" and efficient_ok:
            return "efficient"
        if attention == "sdpa":
            return "flash" if flash_ok else "efficient" if efficient_ok else "math"
        return "efficient" if efficient_ok else "math"

    class _CudaAttention(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.kernels: dict[str, int] = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not F.scaled_dot_product_attention:
                return func(*args, **kwargs)
            a = dict(zip(_SDPA_NAMES, args), **kwargs)
            q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
            dropout, causal, scale = a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale")
            gqa = bool(a.get("enable_gqa", False))
            chosen = kernel(q, k, v, mask, gqa)
            self.kernels[chosen] = self.kernels.get(chosen, 0) + 1
            if chosen == "flash":
                return aten._scaled_dot_product_flash_attention(q, k, v, dropout, causal, False, scale=scale)[0]
            if chosen == "efficient":
                if mask is not None and mask.dtype == torch.bool:  # SDPA's convert_boolean_attn_mask
                    mask = torch.where(mask.logical_not(), float("-inf"), torch.zeros((), dtype=q.dtype))
                if mask is not None:  # SDPA's preprocess_mask: broadcast (a view) to (batch, heads, seq, seq)
                    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
                accumulator = None
                if v.shape[-1] > 128 and q.dtype in half:  # the kernel's float32 output accumulator
                    accumulator = torch.empty(q.shape[0], q.shape[-2], q.shape[-3], v.shape[-1],
                                              dtype=torch.float32, device=q.device)
                out = aten._scaled_dot_product_efficient_attention(q, k, v, mask, False, dropout, causal,
                                                                   scale=scale)[0]
                del accumulator
                return out
            return aten._scaled_dot_product_attention_math(q, k, v, mask, dropout, causal, scale=scale,
                                                            enable_gqa=gqa)[0]

    return _CudaAttention()


_KERNEL_NOTES = {
    "flash": "attention: SDPA as CUDA's flash kernel (output + float32 logsumexp; no attention matrix)",
    "efficient": "attention: SDPA as CUDA's memory-efficient kernel (output, additive mask; float32 output "
                 "accumulator for head dims over 128 in 16-bit; no attention matrix)",
    "math": "attention: SDPA's math kernel (the full attention matrix is materialised)",
}


# -- fake components ------------------------------------------------------------------------------------------------

@dataclass
class _Fake:
    mode: Any  # FakeTensorMode
    module: Any  # torch.nn.Module with fake parameters and buffers
    compute: Any  # torch.dtype
    casting: bool
    seconds: float  # time to build


def _build(component: str):
    if component == "transformer":
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel()
    if component == "text_encoder":
        from transformers import Qwen3Config, Qwen3Model

        return Qwen3Model(Qwen3Config(**TEXT_ENCODER_CONFIG))
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**VAE_CONFIG)
    raise ValueError(f"unknown component {component!r}")


def _cast_in_place(module, dtype) -> None:
    """What `module.to(dtype=dtype)` does to a leaf's floating-point parameters and buffers, one tensor at a time:
    the converted tensor is allocated while the old one is alive, and the old one is released when replaced."""
    import torch

    for name, p in list(module._parameters.items()):
        if p is not None and p.is_floating_point() and p.dtype != dtype:
            module._parameters[name] = torch.nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
    for name, b in list(module._buffers.items()):
        if b is not None and b.is_floating_point() and b.dtype != dtype:
            module._buffers[name] = b.to(dtype)


@contextlib.contextmanager
def _fake_safe_casting_hooks():
    """While casting hooks are registered, diffusers' LayerwiseCastingHook casts with `_cast_in_place` instead of
    `Module.to`: for fake parameters `Module._apply` must swap tensors (torch.utils.swap_tensors), which refuses the
    ones the fake-tensor converter holds weak references to. The registry keeps the hook's bound methods from
    registration, so the fake module keeps this cast; real modules registered later are not affected."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    saved = {k: LayerwiseCastingHook.__dict__[k] for k in ("initialize_hook", "pre_forward", "post_forward")}

    def initialize_hook(self, module):
        _cast_in_place(module, self.storage_dtype)
        return module

    def pre_forward(self, module, *args, **kwargs):
        _cast_in_place(module, self.compute_dtype)
        return args, kwargs

    def post_forward(self, module, output):
        _cast_in_place(module, self.storage_dtype)
        return output

    LayerwiseCastingHook.initialize_hook = initialize_hook
    LayerwiseCastingHook.pre_forward = pre_forward
    LayerwiseCastingHook.post_forward = post_forward
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(LayerwiseCastingHook, k, v)


def fake_module(module, compute_dtype: str = "bfloat16", storage_dtype: str | None = None,
                component: str | None = None) -> _Fake:
    """`module` (built on the meta device, or any device: only shapes are read) in `compute_dtype` with its
    parameters and buffers replaced by fake tensors of a new FakeTensorMode, layerwise cast to `storage_dtype` as a
    replica casts `component` (cluster.weights `layerwise_cast`) when given."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    compute, storage = _dtype(compute_dtype), _dtype(storage_dtype)
    module = torch.nn.Module.to(module, compute).eval().requires_grad_(False)
    mode = FakeTensorMode()
    with mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
                    sub._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)
        casting = storage is not None and storage != compute
        if casting:
            from cluster.weights import layerwise_cast

            with _fake_safe_casting_hooks():
                layerwise_cast(component or "", module, storage, compute)
    return _Fake(mode, module, compute, casting, time.perf_counter() - started)


@functools.cache
def fake_component(component: str, compute_dtype: str = "bfloat16", storage_dtype: str | None = None) -> _Fake:
    """`component` ('transformer', 'text_encoder', 'vae') with its full-size architecture, as `fake_module` makes
    it. Built once per arguments."""
    import torch

    started = time.perf_counter()
    with torch.device("meta"):
        module = _build(component)
    fake = fake_module(module, compute_dtype, storage_dtype, component)
    if component == "transformer":  # the RoPE table it caches on its first call (as a replica keeps it)
        with fake.mode:
            fake.module.rope_embedder(torch.zeros(1, 3, dtype=torch.int32))
    if component == "vae":
        _one_row_blends(fake.module)
    fake.seconds = time.perf_counter() - started
    return fake


def trace_module(build: Callable[[], Any], run: Callable[[Any], Any], compute_dtype: str = "float32",
                 storage_dtype: str | None = None, attention: str = "sdpa", phase: str = "call") -> Traced:
    """Trace `run(module)` on `build()` (a module, built on the meta device) made fake by `fake_module`: the peak
    of the live bytes its ops allocate, parameters and buffers left out. `run` makes its inputs itself (they are
    fake tensors, on the CPU: it runs under the module's FakeTensorMode)."""
    import torch

    with torch.device("meta"):
        module = build()
    fake = fake_module(module, compute_dtype, storage_dtype)
    return _trace(phase, fake, lambda: run(fake.module), attention, [])


def _one_row_blends(vae) -> None:
    """AutoencoderKL's tiled decode blends each tile's overlap into it row by row, in place: per row three row-sized
    temporaries (two products and their sum) that die before the next row. The fake module does the first row only
    (the same ops, so the same transient bytes; the rest repeats them), not hundreds of rows of fake ops per tile."""

    def blend_v(a, b, blend_extent: int):
        blend_extent = min(a.shape[2], b.shape[2], blend_extent)
        for y in range(min(blend_extent, 1)):
            b[:, :, y, :] = a[:, :, -blend_extent + y, :] * (1 - y / blend_extent) + b[:, :, y, :] * (y / blend_extent)
        return b

    def blend_h(a, b, blend_extent: int):
        blend_extent = min(a.shape[3], b.shape[3], blend_extent)
        for x in range(min(blend_extent, 1)):
            b[:, :, :, x] = a[:, :, :, -blend_extent + x] * (1 - x / blend_extent) + b[:, :, :, x] * (x / blend_extent)
        return b

    vae.blend_v, vae.blend_h = blend_v, blend_h


_EXPLAIN: list[list] = []  # breakdown(): where _trace leaves the tensors live at the peak


def breakdown(trace_fn: Callable[..., Traced], *args, **kwargs) -> tuple[Traced, list[tuple]]:
    """`trace_fn(*args, **kwargs)` (one of the trace_ functions) and the tensors live at its activation peak, largest
    first: (bytes, aten op that made it, shape, dtype). For reading what the peak is made of."""
    _EXPLAIN.append([])
    try:
        traced = trace_fn(*args, **kwargs)
        return traced, _EXPLAIN[-1]
    finally:
        _EXPLAIN.pop()


def _trace(phase: str, fake: _Fake, run: Callable[[], Any], attention: str, notes: list[str]) -> Traced:
    import torch

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    weights = [*fake.module.parameters(), *fake.module.buffers()]
    counter = _live_bytes_mode()(weights, fake.compute, fake.casting, explain=bool(_EXPLAIN))
    del weights
    attn = _attention_mode(attention)
    started = time.perf_counter()
    with fake.mode, torch.no_grad(), attn, counter:
        result = run()
        del result
    seconds = time.perf_counter() - started
    if _EXPLAIN:
        _EXPLAIN[-1][:] = counter.at_peak
    notes = list(notes) + [_KERNEL_NOTES[k] for k in sorted(attn.kernels)]
    if fake.casting:
        notes.append(f"layerwise casting: activations and upcast weight copies together peaked at "
                     f"{counter.peak_both} bytes")
    return Traced(phase=phase, peak_bytes=counter.peak, weight_copies_bytes=counter.peak_copies, seconds=seconds,
                  notes=tuple(notes), rounding_bytes=counter.peak_rounding)


# -- the phases -----------------------------------------------------------------------------------------------------

def trace_text_encoder(compute_dtype: str = "bfloat16", tokens: int = MAX_SEQUENCE_LENGTH,
                       storage_dtype: str | None = None) -> Traced:
    """The prompt's encoding (ZImagePipeline._encode_prompt, one prompt): the encoder on `tokens` padded tokens with
    their attention mask, all hidden states kept (output_hidden_states), the second-to-last taken, the real tokens
    kept (bounded by `tokens`). With guidance the negative prompt is encoded after it: the same peak."""
    import torch

    fake = fake_component("text_encoder", compute_dtype, storage_dtype)
    encoder = fake.module

    def run():
        # text_inputs.input_ids.to(device); text_inputs.attention_mask.to(device).bool()
        text_input_ids = torch.empty(1, tokens, dtype=torch.int64)
        prompt_masks = torch.empty(1, tokens, dtype=torch.int64).bool()
        prompt_embeds = encoder(input_ids=text_input_ids, attention_mask=prompt_masks,
                                output_hidden_states=True).hidden_states[-2]
        # embeddings_list.append(prompt_embeds[i][prompt_masks[i]]): boolean-mask indexing (data-dependent),
        # bounded by every token being real.
        return [prompt_embeds[i][:tokens].clone() for i in range(len(prompt_embeds))]

    notes = [("encode: prompt_embeds[i][prompt_masks[i]] (boolean-mask indexing, aten.nonzero: data-dependent) "
              "counted as a copy of all the padded tokens (an upper bound of the real ones)")]
    return _trace("encode", fake, run, "sdpa", notes)


def trace_transformer_step(width: int, height: int, n: int = 1, cfg: bool = False, compute_dtype: str = "bfloat16",
                           storage_dtype: str | None = None, prompt_tokens: int = MAX_SEQUENCE_LENGTH,
                           attention: str = "sdpa") -> Traced:
    """One iteration of ZImagePipeline's denoising loop for `n` images: the latents (float32) and the prompt
    embeddings (`prompt_tokens` real tokens per prompt, and per negative prompt with guidance) the pipeline holds,
    the transformer's forward on n latents (2n with classifier-free guidance, `cfg`: the latents repeated, the
    negative embeddings after the positive ones), the guidance combination and the scheduler's Euler step."""
    import torch

    fake = fake_component("transformer", compute_dtype, storage_dtype)
    transformer = fake.module
    h = 2 * (int(height) // (VAE_SCALE_FACTOR * 2))  # prepare_latents
    w = 2 * (int(width) // (VAE_SCALE_FACTOR * 2))
    guidance_scale = 5.0

    def run():
        latents = torch.empty(n, LATENT_CHANNELS, h, w, dtype=torch.float32)
        prompt_embeds = [torch.empty(prompt_tokens, CAPTION_DIM, dtype=fake.compute) for _ in range(n)]
        negative_prompt_embeds = [torch.empty(prompt_tokens, CAPTION_DIM, dtype=fake.compute)
                                  for _ in range(n)] if cfg else []
        t = torch.empty((), dtype=torch.float32)  # one of scheduler.timesteps

        timestep = t.expand(latents.shape[0])
        timestep = (1000 - timestep) / 1000
        if cfg:
            latents_typed = latents.to(transformer.dtype)
            latent_model_input = latents_typed.repeat(2, 1, 1, 1)
            prompt_embeds_model_input = prompt_embeds + negative_prompt_embeds
            timestep_model_input = timestep.repeat(2)
        else:
            latent_model_input = latents.to(transformer.dtype)
            prompt_embeds_model_input = prompt_embeds
            timestep_model_input = timestep
        latent_model_input = latent_model_input.unsqueeze(2)
        latent_model_input_list = list(latent_model_input.unbind(dim=0))
        model_out_list = transformer(latent_model_input_list, timestep_model_input, prompt_embeds_model_input,
                                     joint_attention_kwargs=None, return_dict=False)[0]
        if cfg:
            pos_out = model_out_list[:n]
            neg_out = model_out_list[n:]
            noise_pred = []
            for j in range(n):
                pos = pos_out[j].float()
                neg = neg_out[j].float()
                pred = pos + guidance_scale * (pos - neg)
                noise_pred.append(pred)
            noise_pred = torch.stack(noise_pred, dim=0)
        else:
            noise_pred = torch.stack([t.float() for t in model_out_list], dim=0)
        noise_pred = noise_pred.squeeze(2)
        noise_pred = -noise_pred
        # scheduler.step (FlowMatchEulerDiscreteScheduler): sample.to(float32) + dt * model_output
        model_output = noise_pred.to(torch.float32)
        sample = latents.to(torch.float32)
        dt = torch.empty((), dtype=torch.float32)  # sigma_next - sigma
        prev_sample = sample + dt * model_output
        latents = prev_sample.to(model_output.dtype)
        return latents

    notes = [("denoise: prompt embeddings of prompt_tokens real tokens for every image (and negative, guided); "
              "the scheduler's Euler step written out")]
    return _trace("denoise", fake, run, attention, notes)


def trace_vae_decode(width: int, height: int, n: int = 1, compute_dtype: str = "bfloat16", tiling: bool = True,
                     tile_px: int = 1024, slicing: bool = True) -> Traced:
    """The pipeline's decode of the final latents of `n` images: the float32 latents cast to the VAE's dtype,
    unscaled, `vae.decode` (tiled at `tile_px` pixels and/or one image at a time, as cluster.profiles apply_vae
    sets them), and the image processor's postprocess up to the copy to the CPU (denormalise and stack)."""
    from types import SimpleNamespace

    import torch
    from diffusers.image_processor import VaeImageProcessor

    from cluster.profiles import apply_vae

    fake = fake_component("vae", compute_dtype, None)
    vae = fake.module
    apply_vae(SimpleNamespace(vae=vae, vae_scale_factor=VAE_SCALE_FACTOR),
              SimpleNamespace(vae_tiling=tiling, vae_tile_px=tile_px, vae_slicing=slicing))
    image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR * 2)
    h = 2 * (int(height) // (VAE_SCALE_FACTOR * 2))
    w = 2 * (int(width) // (VAE_SCALE_FACTOR * 2))

    def run():
        latents = torch.empty(n, LATENT_CHANNELS, h, w, dtype=torch.float32)
        latents = latents.to(vae.dtype)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        # image_processor.postprocess(image, output_type="pil"): its device part, before pt_to_numpy's .cpu()
        image = image_processor.postprocess(image, output_type="pt")
        return image

    return _trace("decode", fake, run, "sdpa", [])
