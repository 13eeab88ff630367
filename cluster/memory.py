"""The memory model: predicted peak VRAM of a request under a profile, with coefficients from a calibration file.

peak = max over the pipeline's three phases (encode prompt, denoise, decode) of what is on the card in that phase,
       + CUDA context + safety margin.

Per phase, each component contributes its weights *on the card in that phase* under the profile:
- resident / fp8_layerwise: all weights at their storage dtype, plus one layer upcast to the compute dtype when the
  storage dtype differs (diffusers' layerwise casting upcasts leaf by leaf);
- group offload (block / leaf): the non-block modules plus one block (leaf level: one leaf), two with a prefetch
  stream, only while that component runs;
- model CPU offload: the whole component, only while it runs (components are on the card one at a time, so their
  weights are a max over phases, not a sum); sequential offload: one leaf while it runs.
Activations: transformer = n x (image tokens + prompt tokens) x bytes per token; image tokens = (W/16) x (H/16)
(VAE factor 8, patch 2); prompt tokens: the pipeline pads every prompt to 512. VAE decode = bytes per pixel x pixels
x images decoded at once; tiling caps the pixels at one tile, slicing decodes one image at a time. Activation
coefficients are for a 2-byte compute dtype and double in float32.
Classifier-free guidance (`cfg`, a request's guidance_scale > 0, as diffusers' ZImagePipeline decides
`do_classifier_free_guidance`): every step runs the transformer on 2n latents (the n images and their negative-prompt
twins, each with its own prompt tokens), so the per-token activation term counts 2n images; the request-independent
activation base does not double. The negative prompt is encoded by a second text-encoder call after the first has
returned (batch one prompt each time), so the encode phase's peak does not grow (the first call's embeddings, a few
MiB, stay below the margin), and the decode phase decodes n images as without guidance.

Every term is named in MemoryEstimate. The numbers come from a Calibration (cluster/calibration/default.json, or the
file in ZIT_CALIBRATION_FILE); the shipped default is an estimate from the model's sizes and published estimates
until `zit calibrate` measures one (see docs/memory.md for which numbers are measured).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.encoding import MAX_SEQUENCE_LENGTH
from cluster.profiles import DTYPE_BYTES, Profile, default_profile
from cluster.tiers import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

if TYPE_CHECKING:
    from collections.abc import Iterable

GIB = 1 << 30

# Where a deployment points at its own measured calibration without touching the package.
ZIT_CALIBRATION_FILE_ENV = "ZIT_CALIBRATION_FILE"
DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration" / "default.json"

# Image tokens per side: the VAE downsamples by 8 and the transformer patches 2x2 latents into one token.
PIXELS_PER_TOKEN_SIDE = 16

# Activation and VAE coefficients are stored for this many bytes per element (bf16/fp16) and scale linearly.
REFERENCE_DTYPE_BYTES = 2


TermSource = Literal["estimate", "traced", "measured"]
# The activation terms a trace bounds (the rest of the calibration is parameter counts and host memory).
TRACED_TERMS = ("activation_bytes_per_token", "text_encoder_activation_bytes", "vae_decode_bytes_per_pixel")
# cuBLAS's workspaces, inside `context_bytes`: 8 buffers of 4 MiB (CUBLAS_WORKSPACE_CONFIG's default :4096:8) and
# cuBLASLt's 32 MiB. An estimate; a trace cannot see them.
CUBLAS_WORKSPACE_BYTES = 64 << 20


class TracedCell(BaseModel):
    """One traced cell: a phase of one pipeline call on fake tensors (cluster/trace.py)."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["encode", "denoise", "decode"]
    compute_dtype: str
    width: int = 0
    height: int = 0
    n: int = 1
    cfg: bool = False
    prompt_tokens: int = 512
    vae_tiling: bool = False
    vae_tile_px: int = 0
    vae_slicing: bool = False
    storage_dtype: str | None = Field(None, description="Layerwise casting's storage dtype (None: no casting).")
    peak_bytes: int = Field(ge=0, description="Peak bytes of live activations (parameters and buffers left out).")
    weight_copies_bytes: int = Field(0, ge=0, description="Peak bytes of the weight copies layerwise casting's hooks "
                                     "upcast to the compute dtype (a weights term of the model, not activations).")
    rounding_bytes: int = Field(0, ge=0, description="What CUDA's caching allocator adds to the live tensors at the "
                                "peak: each block rounded up (512 B; 2 MiB segments for large ones).")
    seconds: float = 0.0


class TracedFigures(BaseModel):
    """What `zit calibrate --trace` recorded: provenance, the least value of each traced term that keeps the model at
    or above every cell, and the cells."""

    model_config = ConfigDict(extra="forbid")

    date: str
    torch: str
    diffusers: str
    seconds: float = Field(description="Wall time of the whole grid on the CPU it ran on.")
    notes: list[str] = Field(default_factory=list, description="What the trace could not run, and how it is bounded.")
    bounds: dict[str, float] = Field(default_factory=dict, description="Per traced term: the least value that "
                                     "keeps the model at or above every cell (with the unseen parts).")
    cells: list[TracedCell] = Field(default_factory=list)


class Calibration(BaseModel):
    """Coefficients of the memory model and where they come from (card, driver, library versions, date)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["estimate", "measured"] = Field(
        description="'measured' when the coefficients were fitted to GPU measurements, else 'estimate'."
    )
    architecture: str = Field(description="What was measured: 'z-image-turbo' (full size) or 'tiny'.")
    card: str | None = Field(None, description="GPU name the measurements come from (None for an estimate).")
    driver: str | None = Field(None, description="NVIDIA driver version of the measurements.")
    torch: str | None = Field(None, description="PyTorch version of the measurements.")
    diffusers: str | None = Field(None, description="diffusers version of the measurements.")
    date: str = Field(description="ISO date the file was made.")
    notes: str = Field("", description="How the numbers were obtained, in words.")
    transformer_params: int = Field(gt=0, description="Parameters of the transformer.")
    transformer_blocks: int = Field(gt=0, description="Offloadable blocks (main layers + refiner layers).")
    transformer_block_params: int = Field(gt=0, description="Parameters of the largest block.")
    transformer_leaf_params: int = Field(gt=0, description="Parameters of the largest leaf module (one Linear).")
    text_encoder_params: int = Field(gt=0, description="Parameters of the text encoder.")
    text_encoder_layer_params: int = Field(gt=0, description="Parameters of one text encoder layer.")
    text_encoder_embedding_params: int = Field(
        ge=0, description="Parameters of the token embedding (kept in the compute dtype, never layerwise cast)."
    )
    text_encoder_leaf_params: int = Field(gt=0, description="Parameters of the text encoder's largest Linear.")
    vae_params: int = Field(gt=0, description="Parameters of the VAE.")
    prompt_tokens: int = Field(gt=0, description="Prompt tokens the transformer sees at most: the bound used where "
                               "a request is not tokenized yet (the encoder runs on 512 padded tokens, the "
                               "transformer on the real ones padded to a multiple of 32: `for_prompt`).")
    activation_bytes_per_token: float = Field(
        ge=0, description="Transformer activation peak per token per image, at a 2-byte compute dtype."
    )
    activation_base_bytes: float = Field(ge=0, description="Transformer activation peak independent of the request.")
    text_encoder_activation_bytes: float = Field(
        ge=0, description="Text encoder activation peak for one padded prompt, at a 2-byte compute dtype."
    )
    vae_decode_bytes_per_pixel: float = Field(
        ge=0, description="VAE decode peak per output pixel of one image decoded at once, at a 2-byte dtype."
    )
    vae_output_bytes_per_pixel: float = Field(
        ge=0, description="Decoded image kept per pixel per image (float32 RGB plus tile blending)."
    )
    context_bytes: float = Field(ge=0, description="CUDA context, cuBLAS workspace and kernels outside PyTorch's pool.")
    margin_fraction: float = Field(ge=0, le=1, description="Safety margin as a fraction of the predicted peak.")
    margin_min_bytes: float = Field(ge=0, description="Smallest safety margin (allocator rounding, fragmentation).")
    # Host memory (cluster/host_memory.py). Defaults: the shipped estimate's, so older calibration files still load.
    transformer_skipped_params: int = Field(
        10_900_992, ge=0, description="Transformer parameters layerwise casting skips (norms, embedders): stored in "
        "the compute dtype (cluster/weights.py parts).")
    text_encoder_skipped_params: int = Field(
        389_152_256, ge=0, description="Text-encoder parameters layerwise casting skips (the token embedding, the "
        "norms): stored in the compute dtype.")
    transformer_pinned_rounding: float = Field(
        1.508, ge=1, description="Pinned host bytes per byte of transformer weights: PyTorch's pinned allocator "
        "rounds each parameter's block up to a power of two (computed from the parameter shapes).")
    text_encoder_pinned_rounding: float = Field(
        1.41, ge=1, description="The same for the text encoder (Qwen3-4B's parameter shapes).")
    host_runtime_bytes: float = Field(
        0.5 * GIB, ge=0, description="Host RAM of a replica process without weights: Python, torch, diffusers, the "
        "Ray worker (measured on the CPU).")
    host_cuda_bytes: float = Field(
        1.0 * GIB, ge=0, description="Host RAM the CUDA runtime adds to a process on a card (driver, cuBLAS and "
        "cuDNN kernel images).")
    host_ray_node_bytes: float = Field(
        0.25 * GIB, ge=0, description="Host RAM of one Ray node's own processes (raylet, dashboard and runtime-env "
        "agents); a node per card.")
    host_proxy_bytes: float = Field(
        0.15 * GIB, ge=0, description="Host RAM of a Serve HTTP proxy: one on every node with a replica "
        "(proxy_location EveryNode), a card node's included (measured on the CPU: 142 MB resident, 93 MB PSS).")
    host_head_bytes: float = Field(
        2.0 * GIB, ge=0, description="Host RAM of the head's processes: GCS, dashboard, Serve controller, proxy, "
        "ingress, registry.")
    fit: dict = Field(default_factory=dict, description="Fit residuals and point counts when source is 'measured'.")
    term_sources: dict[str, TermSource] = Field(
        default_factory=dict, description="Where each activation term comes from: 'estimate' (reasoned, in `notes`), "
        "'traced' (raised to the lower bound a fake-tensor trace of the full-size model found: `zit calibrate "
        "--trace`), 'measured' (fitted to GPU runs). A term not listed has the file's `source`.")
    traced: TracedFigures | None = Field(
        None, description="The fake-tensor trace's figures (`zit calibrate --trace`): per grid cell the peak bytes of "
        "live activations, a lower bound of what CUDA holds; the model never predicts below them plus what a trace "
        "cannot see (`unseen_by_trace`).")

    def term_source(self, term: str) -> str:
        return self.term_sources.get(term, self.source)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one pipeline call, term by term, at its worst phase."""

    weights: int  # transformer weights on the card in the peak phase
    activations: int  # transformer activations (denoise phase)
    vae: int  # VAE weights + decode peak
    text_encoder: int  # text encoder weights + activations on the card
    context: int  # CUDA context outside PyTorch's allocator
    margin: int  # safety margin
    phase: str = "denoise"  # which phase peaks: encode, denoise or decode

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.vae + self.text_encoder + self.context + self.margin

    def terms(self) -> dict[str, float]:
        """Every term in GiB (3 decimals), for JSON and tables."""
        out = {f.name: round(getattr(self, f.name) / GIB, 3) for f in fields(self) if f.name != "phase"}
        out["total"] = round(self.total / GIB, 3)
        return out


def load_calibration(path: str | Path | None = None) -> Calibration:
    """The calibration at `path`, else ZIT_CALIBRATION_FILE, else the shipped default (an estimate).

    Fails with ValueError naming the file when it is missing or does not validate.
    """
    chosen = Path(path or os.environ.get(ZIT_CALIBRATION_FILE_ENV) or DEFAULT_CALIBRATION)
    return _load_cached(str(chosen.resolve()), chosen.stat().st_mtime_ns if chosen.exists() else 0)


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Calibration:
    try:
        return Calibration.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(
            f"calibration file {path} not found; set {ZIT_CALIBRATION_FILE_ENV} to a file written by `zit calibrate`, "
            "or unset it to use the shipped estimate"
        ) from None
    except ValueError as exc:
        raise ValueError(f"calibration file {path} is not valid: {exc}") from exc


# The transformer pads each prompt's tokens to a multiple of this (diffusers' transformer_z_image SEQ_MULTI_OF).
SEQ_MULTI_OF = 32
# In a measured calibration's `fit`: its runs recorded the transformer's prompt tokens (else it keeps the bound).
PROMPT_TOKENS_RECORDED = "prompt_tokens_recorded"


def transformer_prompt_tokens(tokens: int | None, calibration: Calibration | None = None) -> int:
    """The prompt tokens the transformer runs for a prompt of `tokens` real tokens: the pipeline encodes the prompt
    padded to 512 (cluster.encoding.MAX_SEQUENCE_LENGTH) and hands the transformer only its real tokens, which the
    transformer pads to a multiple of 32 (at least 32). None (not tokenized yet): the bound, `prompt_tokens` of the
    calibration (512: no prompt has more, longer ones are truncated)."""
    cal = calibration or load_calibration()
    if tokens is None:
        return cal.prompt_tokens
    padded = max(SEQ_MULTI_OF, math.ceil(tokens / SEQ_MULTI_OF) * SEQ_MULTI_OF)
    return min(padded, MAX_SEQUENCE_LENGTH)


def for_prompt(calibration: Calibration | None, tokens: int | None) -> Calibration:
    """The calibration to predict a request whose longest prompt (with guidance: the prompt or the negative prompt)
    has `tokens` real tokens: the same coefficients, `prompt_tokens` the transformer's count for it
    (`transformer_prompt_tokens`). None: the bound, unchanged. Used where the request is tokenized before it is
    routed (the text-encoder stage encodes it first); elsewhere the bound holds."""
    cal = calibration or load_calibration()
    if cal.source == "measured" and not cal.fit.get(PROMPT_TOKENS_RECORDED):
        return cal  # fitted from runs that did not record their tokens, as if they had 512: keep the bound
    count = transformer_prompt_tokens(tokens, cal)
    return cal if count == cal.prompt_tokens else cal.model_copy(update={"prompt_tokens": count})


def image_tokens(width: int, height: int) -> int:
    """Transformer tokens of one image: one per 16x16 pixels (VAE factor 8, patch 2)."""
    return math.ceil(width / PIXELS_PER_TOKEN_SIDE) * math.ceil(height / PIXELS_PER_TOKEN_SIDE)


def uses_cfg(guidance_scale: float) -> bool:
    """Whether a request with this guidance_scale runs classifier-free guidance (diffusers' ZImagePipeline:
    `do_classifier_free_guidance` is `guidance_scale > 0`), which doubles the transformer's batch."""
    return guidance_scale > 0


def transformer_batch(n: int, cfg: bool = False) -> int:
    """Latents the transformer runs per step for n images: each image, and with classifier-free guidance (`cfg`) its
    negative-prompt twin."""
    return 2 * n if cfg else n


def predict_peak(
    width: int, height: int, n: int, profile: Profile, calibration: Calibration | None = None, cfg: bool = False
) -> MemoryEstimate:
    """Peak bytes of generating n images of width x height in one call under `profile` (see the module docstring);
    `cfg`: with classifier-free guidance (the transformer runs 2n latents).

    Algorithm: compute the bytes on the card in each phase (encode, denoise, decode), take the phase with the most,
    add the context and a margin of max(margin_min_bytes, margin_fraction x subtotal). Pure arithmetic; never fails
    for positive sizes.
    """
    cal = calibration or load_calibration()
    peak = max(predict_phases(width, height, n, profile, cal, cfg).values(), key=lambda e: e.total)
    context = int(cal.context_bytes)
    margin = int(max(cal.margin_min_bytes, cal.margin_fraction * (peak.total + context)))
    return MemoryEstimate(peak.weights, peak.activations, peak.vae, peak.text_encoder, context, margin, peak.phase)


def smallest_request(profile: Profile, calibration: Calibration | None = None) -> MemoryEstimate:
    """The estimate for the smallest request (one image of MIN_IMAGE_SIDE square): a card with less room than its
    total can serve nothing."""
    return predict_peak(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 1, profile, calibration)


def encoder_peak(profile: Profile, calibration: Calibration | None = None) -> MemoryEstimate:
    """Peak bytes of the text-encoder stage's process on its card: the encoder's weights as `profile.text_encoder`
    places them ('gpu': resident; 'offload': the embedding and one or two layers in flight), its activations on the
    padded prompt, the process's own CUDA context and the margin. One prompt at a time (the negative prompt is a
    second call), so the peak does not grow with requests. Raises ValueError for a profile that keeps no encoder on
    the card ('cpu', 'stage')."""
    if profile.text_encoder not in ("gpu", "offload"):
        raise ValueError(f"the text-encoder stage runs its encoder on a card ('gpu' or 'offload'); "
                         f"got text_encoder={profile.text_encoder!r}")
    cal = calibration or load_calibration()
    running, _ = _text_encoder_bytes(profile, cal)
    activations = int(cal.text_encoder_activation_bytes * DTYPE_BYTES[profile.compute_dtype] / REFERENCE_DTYPE_BYTES)
    context = int(cal.context_bytes)
    margin = int(max(cal.margin_min_bytes, cal.margin_fraction * (running + activations + context)))
    return MemoryEstimate(0, 0, 0, running + activations, context, margin, "encode")


def resident_bytes(profile: Profile, calibration: Calibration | None = None) -> int:
    """What a loaded replica holds on its card between jobs under `profile`: the weights that stay there at rest
    (the transformer when resident, the VAE unless everything is offloaded, the text encoder when resident) and the
    CUDA context. Placement, simulated cards and the fleet simulator use it."""
    cal = calibration or load_calibration()
    phases = predict_phases(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE, 1, profile, cal)
    # At rest: the transformer's weights outside its own phase (encode), the VAE's and the encoder's outside
    # theirs (denoise).
    return phases["encode"].weights + phases["denoise"].vae + phases["denoise"].text_encoder + int(cal.context_bytes)


def predict_phases(
    width: int, height: int, n: int, profile: Profile, calibration: Calibration | None = None, cfg: bool = False
) -> dict[str, MemoryEstimate]:
    """Bytes on the card in each phase ('encode', 'denoise', 'decode'), without context and margin. With `cfg` the
    transformer's per-token activations count 2n images (the module docstring says why nothing else changes)."""
    cal = calibration or load_calibration()
    c = DTYPE_BYTES[profile.compute_dtype]
    scale = c / REFERENCE_DTYPE_BYTES
    offload_all = profile.weights in ("model_cpu_offload", "sequential_cpu_offload")

    # Transformer weights: while denoising (running) and in the other phases (at rest).
    t_running = _transformer_running(profile, cal)
    t_rest = t_running if profile.weights in ("resident", "fp8_layerwise") else 0
    # Text encoder weights and activations: while encoding and at rest.
    te_act = int(cal.text_encoder_activation_bytes * scale)
    te_running, te_rest = _text_encoder_bytes(profile, cal)
    if profile.text_encoder not in ("cpu", "stage"):
        te_running += te_act
    # VAE: weights (at rest unless everything is offloaded) and the decode peak.
    vae_w = cal.vae_params * c
    vae_rest = 0 if offload_all else vae_w
    if profile.weights == "sequential_cpu_offload":
        vae_w = 0  # one small leaf at a time; below the margin
    per_image_px = width * height
    if profile.vae_tiling:
        per_image_px = min(width, profile.vae_tile_px) * min(height, profile.vae_tile_px)
    decoded_at_once = 1 if profile.vae_slicing else n
    decode = int(
        cal.vae_decode_bytes_per_pixel * scale * per_image_px * decoded_at_once
        + cal.vae_output_bytes_per_pixel * width * height * n
    )
    activations = int(
        cal.activation_base_bytes * scale
        + cal.activation_bytes_per_token * scale * transformer_batch(n, cfg)
        * (image_tokens(width, height) + cal.prompt_tokens)
    )

    return {
        "encode": MemoryEstimate(t_rest, 0, vae_rest, te_running, 0, 0, "encode"),
        "denoise": MemoryEstimate(t_running, activations, vae_rest, te_rest, 0, 0, "denoise"),
        "decode": MemoryEstimate(t_rest, 0, int(vae_w + decode), te_rest, 0, 0, "decode"),
    }


def _transformer_running(profile: Profile, cal: Calibration) -> int:
    """Transformer weight bytes on the card while it runs."""
    s = DTYPE_BYTES[profile.transformer_storage]
    c = DTYPE_BYTES[profile.compute_dtype]
    upcast = cal.transformer_leaf_params * c if s != c else 0  # one leaf at a time in the compute dtype
    in_flight = 2 if profile.offload_stream else 1  # the running group and the prefetched one
    # LoRA adapters stay in the compute dtype; offloaded groups carry their adapters with them (below the margin).
    lora = profile.lora_params * c
    if profile.weights in ("resident", "fp8_layerwise", "model_cpu_offload"):
        return cal.transformer_params * s + upcast + lora
    if profile.weights == "group_offload_block":
        non_block = cal.transformer_params - cal.transformer_blocks * cal.transformer_block_params
        return max(0, non_block) * s + in_flight * cal.transformer_block_params * s + upcast
    if profile.weights == "group_offload_leaf":
        return in_flight * cal.transformer_leaf_params * s + upcast
    return cal.transformer_leaf_params * (s + (c if s != c else 0))  # sequential: one leaf, no prefetch


def _text_encoder_bytes(profile: Profile, cal: Calibration) -> tuple[int, int]:
    """(bytes while encoding, bytes at rest) of the text encoder's weights on the card."""
    s = DTYPE_BYTES[profile.text_encoder_storage]
    c = DTYPE_BYTES[profile.compute_dtype]
    if profile.text_encoder in ("cpu", "stage"):
        return 0, 0
    upcast = cal.text_encoder_leaf_params * c if s != c else 0  # one Linear at a time in the compute dtype
    embedding = cal.text_encoder_embedding_params * c  # never cast: stays in the compute dtype
    if profile.text_encoder == "gpu":
        rest = (cal.text_encoder_params - cal.text_encoder_embedding_params) * s + embedding
        return rest + upcast, rest
    if profile.weights == "model_cpu_offload":
        return (cal.text_encoder_params - cal.text_encoder_embedding_params) * s + embedding + upcast, 0
    in_flight = 1 if profile.weights == "sequential_cpu_offload" else (2 if profile.offload_stream else 1)
    return embedding + in_flight * cal.text_encoder_layer_params * s + upcast, 0


# -- the fake-tensor trace's lower bound (cluster/trace.py, `zit calibrate --trace`) --------------------------------


def unseen_by_trace(cell: TracedCell, calibration: Calibration | None = None) -> dict[str, int]:
    """What CUDA holds beside a phase's live tensors that a trace on fake tensors cannot see, by name and size: the
    CUDA context with its kernel images and cuBLAS's workspaces (together `context_bytes`, an estimate), and the
    caching allocator's rounding of the blocks live at the peak (counted by the trace)."""
    cal = calibration or load_calibration()
    return {"cuda_context": int(cal.context_bytes) - CUBLAS_WORKSPACE_BYTES,
            "cublas_workspace": CUBLAS_WORKSPACE_BYTES, "allocator_rounding": cell.rounding_bytes}


def trace_floor(cell: TracedCell, calibration: Calibration | None = None) -> int:
    """The least CUDA can hold beside the weights for the cell's phase: its traced peak plus what a trace cannot
    see."""
    return cell.peak_bytes + sum(unseen_by_trace(cell, calibration).values())


def _cell_profile(cell: TracedCell) -> Profile:
    """A profile with the cell's compute dtype and VAE settings (a phase's activations do not depend on where the
    weights live)."""
    from cluster.profiles import DEFAULT_VAE_TILE_PX

    base = default_profile("vram_24", cell.compute_dtype == "bfloat16")
    return base.model_copy(update={"compute_dtype": cell.compute_dtype, "vae_tiling": cell.vae_tiling,
                                   "vae_tile_px": cell.vae_tile_px or DEFAULT_VAE_TILE_PX,
                                   "vae_slicing": cell.vae_slicing})


def _phase_bytes(cell: TracedCell, cal: Calibration) -> int:
    """The model's bytes for the cell's phase beside the weights, context and margin: the transformer's activations
    (denoise), the VAE's decode bytes (decode) or the encoder's activations (encode)."""
    if cell.phase == "encode":
        return int(cal.text_encoder_activation_bytes * DTYPE_BYTES[cell.compute_dtype] / REFERENCE_DTYPE_BYTES)
    at = cal.model_copy(update={"prompt_tokens": cell.prompt_tokens})
    phases = predict_phases(cell.width, cell.height, cell.n, _cell_profile(cell), at, cell.cfg)
    if cell.phase == "denoise":
        return phases["denoise"].activations
    return phases["decode"].vae - cal.vae_params * DTYPE_BYTES[cell.compute_dtype]


def predicted_beside_weights(cell: TracedCell, calibration: Calibration | None = None) -> int:
    """The model's bytes beside the weights for the cell's phase (`_phase_bytes`), plus the context and the smallest
    margin (every prediction has at least that much margin)."""
    cal = calibration or load_calibration()
    return _phase_bytes(cell, cal) + int(cal.context_bytes) + int(cal.margin_min_bytes)


# The traced term each phase's bytes grow with (linearly: `trace_bounds` reads its slope from the model itself).
PHASE_TERM = {"encode": "text_encoder_activation_bytes", "denoise": "activation_bytes_per_token",
              "decode": "vae_decode_bytes_per_pixel"}


def trace_bounds(cells: "Iterable[TracedCell]", calibration: Calibration) -> dict[str, float]:
    """Per traced term (TRACED_TERMS), the least value at which the term alone holds every cell's traced bytes and
    their rounding (the other terms as `calibration` has them): the margin is left for what nothing here counts
    (fragmentation, kernel workspaces), so `predicted_beside_weights` stays above `trace_floor` with room. The
    phase's bytes are linear in its term: the bound is read off the model at the term's 0 and at a large value."""
    need: dict[str, float] = {term: 0.0 for term in TRACED_TERMS}
    probe = 1e6
    for cell in cells:
        term = PHASE_TERM[cell.phase]
        at_zero = _phase_bytes(cell, calibration.model_copy(update={term: 0.0}))
        slope = (_phase_bytes(cell, calibration.model_copy(update={term: probe})) - at_zero) / probe
        gap = trace_floor(cell, calibration) - int(calibration.context_bytes)  # the live bytes and their rounding
        need[term] = max(need[term], (gap - at_zero) / slope)
    return {term: math.ceil(max(0.0, value)) for term, value in need.items()}


def with_trace(calibration: Calibration, figures: TracedFigures) -> Calibration:
    """`calibration` with the trace's figures beside its terms, each traced term raised to the trace's bound where
    it was below (its source then 'traced'), so the model never predicts under a traced cell."""
    bounds = trace_bounds(figures.cells, calibration)
    update: dict = {"traced": figures.model_copy(update={"bounds": bounds}),
                    "term_sources": dict(calibration.term_sources)}
    raised = []
    for term, bound in bounds.items():
        if getattr(calibration, term) < bound:
            raised.append(f"{term} from {getattr(calibration, term):,.0f} to {bound:,.0f}")
            update[term] = float(bound)
            update["term_sources"][term] = "traced"
    if raised:
        update["notes"] = (f"{calibration.notes} Raised to the fake-tensor trace's lower bound ({figures.date}): "
                           + "; ".join(raised) + ".")
    return calibration.model_copy(update=update)


def effective_budget(profile: Profile, budget_bytes: int) -> int:
    """The card's budget, lowered to the profile's per-process cap when it has one."""
    if profile.max_memory_gb:
        return min(budget_bytes, int(profile.max_memory_gb * GIB))
    return budget_bytes


def fits(
    width: int, height: int, n: int, profile: Profile, budget_bytes: int, calibration: Calibration | None = None,
    cfg: bool = False,
) -> str | None:
    """None when n images of width x height (with classifier-free guidance when `cfg`) fit `budget_bytes` under
    `profile`, else why not, with the numbers."""
    if width * height > profile.max_pixels:
        return f"{width}x{height} is {width * height} pixels, above profile {profile.name}'s max_pixels {profile.max_pixels}"
    if n > profile.max_n:
        return f"n={n} is above profile {profile.name}'s max_n {profile.max_n}; split it into chunks"
    estimate = predict_peak(width, height, n, profile, calibration, cfg)
    budget = effective_budget(profile, budget_bytes)
    if estimate.total > budget:
        worst = max(("weights", "activations", "vae", "text_encoder"), key=lambda k: getattr(estimate, k))
        guided = " with classifier-free guidance (transformer batch doubled)" if cfg else ""
        return (
            f"predicted peak{guided} {estimate.total / GIB:.2f} GiB ({estimate.phase} phase; largest term {worst} "
            f"{getattr(estimate, worst) / GIB:.2f} GiB) is above the {budget / GIB:.2f} GiB budget"
        )
    return None


def largest_batch(
    width: int, height: int, profile: Profile, budget_bytes: int, calibration: Calibration | None = None,
    cfg: bool = False,
) -> int:
    """The most images of width x height one call fits in `budget_bytes` (0 if not even one), at most max_n; with
    `cfg`, guided images (each costs the transformer twice the activations)."""
    best = 0
    for n in range(1, profile.max_n + 1):  # at most 16 evaluations of a few multiplications
        if fits(width, height, n, profile, budget_bytes, calibration, cfg) is not None:
            break
        best = n
    return best


def largest_square(
    profile: Profile, budget_bytes: int, n: int = 1, calibration: Calibration | None = None, cfg: bool = False
) -> int:
    """The largest side (multiple of 16, at most 2048) of n square images (guided when `cfg`) that fit, or 0 if none
    does.

    Binary search over sides: the peak never decreases as the side grows (every term is non-decreasing in pixels).
    """
    lo, hi = 0, MAX_IMAGE_SIDE // PIXELS_PER_TOKEN_SIDE  # in units of 16 pixels; lo always fits (or is 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        side = mid * PIXELS_PER_TOKEN_SIDE
        if fits(side, side, n, profile, budget_bytes, calibration, cfg) is None:
            lo = mid
        else:
            hi = mid - 1
    return lo * PIXELS_PER_TOKEN_SIDE


# -- fitting measured runs (used by `zit calibrate`) ---------------------------------------------------------------


def fit_calibration(records: "Iterable[dict]", base: Calibration, **provenance) -> Calibration:
    """A measured Calibration: `base` with its activation, VAE and margin coefficients fitted to `records`.

    Each record (one pipeline call, as `zit calibrate` writes it) has: profile (a Profile dump), width, height, n,
    rest_bytes (allocated before the call), denoise_peak_bytes (allocated peak up to the last step), decode_peak_bytes
    (allocated peak during decode), reserved_peak_bytes, context_bytes (NVML used minus PyTorch reserved).

    Algorithm: least squares with one intercept per profile (the offloaded weights each profile has in flight):
      denoise_peak - rest = a x scale x n x (tokens + prompt tokens) + b_profile
      decode_peak  - rest = v x scale x decoded pixels + o x pixels x n + d_profile
    then the context is the median measured context, and the margin fraction is raised until every record's
    reserved peak is at or under the prediction. Raises ValueError with fewer than two sizes to fit.
    """
    import numpy as np

    rows = [r for r in records if not r.get("oom") and r.get("denoise_peak_bytes")]
    if len({(r["width"], r["height"], r["n"]) for r in rows}) < 2:
        raise ValueError(f"need runs at two or more sizes to fit a calibration; got {len(rows)} usable run(s)")
    profiles = sorted({r["profile"]["name"] for r in rows})
    onehot = lambda r: [1.0 if r["profile"]["name"] == p else 0.0 for p in profiles]  # noqa: E731

    def scale(r):
        return DTYPE_BYTES[r["profile"]["compute_dtype"]] / REFERENCE_DTYPE_BYTES

    def decoded_px(r):
        p = Profile.model_validate(r["profile"])
        w, h = r["width"], r["height"]
        px = min(w, p.vae_tile_px) * min(h, p.vae_tile_px) if p.vae_tiling else w * h
        return px * (1 if p.vae_slicing else r["n"])

    # The transformer's prompt tokens of each run: its prompt's real count when the run recorded it.
    tokens = lambda r: r["n"] * (image_tokens(r["width"], r["height"])  # noqa: E731
                                 + transformer_prompt_tokens(r.get("prompt_tokens"), base))
    a_rows = np.array([[scale(r) * tokens(r), *onehot(r)] for r in rows])
    a_y = np.array([r["denoise_peak_bytes"] - r["rest_bytes"] for r in rows], dtype=float)
    (a, *_), a_res, *_ = np.linalg.lstsq(a_rows, a_y, rcond=None)
    v_rows = np.array([[scale(r) * decoded_px(r), r["width"] * r["height"] * r["n"], *onehot(r)] for r in rows])
    v_y = np.array([r["decode_peak_bytes"] - r["rest_bytes"] for r in rows], dtype=float)
    (v, o, *_), v_res, *_ = np.linalg.lstsq(v_rows, v_y, rcond=None)
    contexts = sorted(r["context_bytes"] for r in rows if r.get("context_bytes"))
    fitted = base.model_copy(
        update={
            "source": "measured",
            "activation_bytes_per_token": max(0.0, float(a)),
            "vae_decode_bytes_per_pixel": max(0.0, float(v)),
            "vae_output_bytes_per_pixel": max(0.0, float(o)),
            "context_bytes": float(contexts[len(contexts) // 2]) if contexts else base.context_bytes,
            **provenance,
        }
    )
    # The margin must cover what the linear terms miss: raise it until every measured reserved peak is predicted.
    needed = base.margin_fraction
    for r in rows:
        est = predict_peak(r["width"], r["height"], r["n"], Profile.model_validate(r["profile"]),
                           for_prompt(fitted, r.get("prompt_tokens")))
        measured = r.get("reserved_peak_bytes", 0) + fitted.context_bytes
        subtotal = est.total - est.margin
        if measured > subtotal + fitted.margin_min_bytes:
            needed = max(needed, (measured - subtotal) / subtotal)
    fitted = fitted.model_copy(update={"margin_fraction": round(min(1.0, needed + 0.01), 3)})
    fitted.fit = {
        "runs": len(rows),
        "profiles": profiles,
        "activation_residual_gib": float(np.sqrt(a_res[0] / len(rows)) / GIB) if len(a_res) else None,
        "vae_residual_gib": float(np.sqrt(v_res[0] / len(rows)) / GIB) if len(v_res) else None,
        # Every run said how many prompt tokens the transformer got: the per-token term is per real token, so
        # `for_prompt` may predict below the 512 bound with it.
        PROMPT_TOKENS_RECORDED: all("prompt_tokens" in r for r in rows),
    }
    return fitted


def architecture_of(pipe) -> dict[str, int]:
    """Parameter counts of a loaded ZImagePipeline, in Calibration's field names (exact, read from the modules)."""
    import torch

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    t, te = pipe.transformer, pipe.text_encoder
    blocks = [b for name in ("layers", "noise_refiner", "context_refiner") for b in getattr(t, name)]
    leaves = [m for m in t.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return {
        "transformer_params": count(t),
        "transformer_blocks": len(blocks),
        "transformer_block_params": max(count(b) for b in blocks),
        "transformer_leaf_params": max(count(m) for m in leaves),
        "text_encoder_params": count(te),
        "text_encoder_layer_params": max(count(layer) for layer in te.layers),
        "text_encoder_embedding_params": count(te.embed_tokens),
        "text_encoder_leaf_params": max(count(m) for m in te.modules() if isinstance(m, torch.nn.Linear)),
        "vae_params": count(pipe.vae),
    }
