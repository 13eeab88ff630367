"""Tier profiles: the memory techniques that make Z-Image-Turbo fit a class of cards, and how to apply them.

A `Profile` is data (every knob an operator may override per tier); `apply_profile` turns it into calls of diffusers',
PyTorch's and accelerate's own APIs on a loaded `ZImagePipeline`. Nothing here moves a tensor by hand.

Default profile per VRAM tier (nominal size; the memory model in cluster/memory.py decides what each one accepts):

| tier    | transformer weights                         | text encoder (Qwen3-4B)     | VAE                 |
| ------- | ------------------------------------------- | --------------------------- | ------------------- |
| vram_24 | resident, bf16 storage (12.3 GB)            | group offload, block level  | slicing, tiles 1024 |
| vram_16 | resident, fp8 storage, layerwise upcast     | group offload, block level  | slicing, tiles 1024 |
| vram_12 | resident, fp8 storage, layerwise upcast     | group offload, block level  | slicing, tiles 1024 |
| vram_8  | group offload, one block + prefetch, fp8    | group offload, block level  | slicing, tiles 768  |
| vram_6  | group offload, one block + prefetch, bf16   | group offload, block level  | slicing, tiles 512  |
| vram_4  | group offload, leaf level + prefetch, bf16  | group offload, block level  | slicing, tiles 512  |

A tier of an operator's own table (`--tiers 4,8,10,24`, cluster/tiers.py) runs the row of the largest shipped tier at
or below its size (vram_10: vram_8's row; below 4 GB: vram_4's), planned at its own size.

Compute dtype: bfloat16 on cards with bf16 (compute capability >= 8.0), float32 everywhere else. Plain float16 is
never chosen: this model gives NaN or black images in fp16 (Tongyi-MAI/Z-Image issues #14, #15). On float32 cards the
weights stay stored in bf16 (or fp8) and diffusers' layerwise casting upcasts one layer at a time, so an old card
pays float32 only for activations, not for 24.6 GB of float32 weights.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.tiers import (
    GIB,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    VRAM_TIERS_GIB,
    ZIT_VRAM_TIERS_GB_ENV,
    TierConfig,
    classify,
    vram_tiers,
)

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

logger = logging.getLogger(__name__)

ComputeDtype = Literal["bfloat16", "float16", "float32"]
StorageDtype = Literal["float8_e4m3fn", "bfloat16", "float16", "float32"]
Placement = Literal[
    "resident", "fp8_layerwise", "group_offload_block", "group_offload_leaf", "model_cpu_offload",
    "sequential_cpu_offload",
]
# Placements whose hooks move weights between the CPU and an accelerator; on a CPU-only machine they have nothing to
# move to (diffusers raises deep inside accelerate), so apply_profile refuses them up front with the fix.
ACCELERATOR_ONLY_PLACEMENTS = ("model_cpu_offload", "sequential_cpu_offload")

# Bytes per element of every dtype a profile may name (float8 is one byte: the point of fp8 storage).
DTYPE_BYTES: dict[str, int] = {"float8_e4m3fn": 1, "bfloat16": 2, "float16": 2, "float32": 4}

# What diffusers' attention dispatcher calls our three backends; "native" is PyTorch's SDPA.
_ATTENTION_BACKENDS = {"sdpa": "native", "xformers": "xformers", "flash": "flash"}

# The Flux VAE's own tile (its config's sample_size): tiling at this size changes nothing up to 1024x1024.
DEFAULT_VAE_TILE_PX = 1024

CPU_TIER = "cpu"


class ProfileError(ValueError):
    """A profile cannot be built or applied as asked; the message names the knob and the fix."""


class Profile(BaseModel):
    """How one tier loads and runs the pipeline: dtypes, where each component's weights live, VAE, limits."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Profile name, by default the tier's (e.g. 'vram_12' or 'vram_6-fp32').")
    compute_dtype: ComputeDtype = Field(
        description="Dtype of the arithmetic. bfloat16 needs compute capability >= 8.0; float32 is the safe path "
        "elsewhere; float16 gives NaN/black images with Z-Image-Turbo and is only allowed as an explicit override."
    )
    weights: Placement = Field(
        description="Where the transformer's weights live: resident on the card; fp8_layerwise (resident, stored in "
        "fp8, upcast layer by layer); group offload of one block or one leaf at a time from CPU memory; or "
        "diffusers' model / sequential CPU offload of the whole pipeline (these need an accelerator)."
    )
    storage_dtype: StorageDtype | None = Field(
        None,
        description="Dtype the transformer (and, unless fp8, the text encoder) is stored in; layerwise casting "
        "upcasts each layer to compute_dtype for its forward. None: float8_e4m3fn for fp8_layerwise, else "
        "compute_dtype (no casting).",
    )
    text_encoder: Literal["gpu", "offload", "cpu", "stage"] = Field(
        description="Where Qwen3-4B (about 8 GB in bf16) runs: 'gpu' resident on the pipeline's device, 'offload' "
        "group-offloaded layer by layer onto it for each prompt, 'cpu' kept and run on the CPU, 'stage' not in this "
        "pipeline at all: the text-encoder stage (deployments/encoder.py) encodes each request once and the pipeline "
        "takes the embeddings."
    )
    offload_stream: bool = Field(
        True,
        description="Group offload prefetches the next group on a CUDA stream while the current one computes "
        "(faster, one more group resident). Ignored, with a log line, on a device without streams.",
    )
    vae_tiling: bool = Field(description="Decode the image in tiles (caps the VAE's peak for large images).")
    vae_tile_px: int = Field(
        DEFAULT_VAE_TILE_PX, ge=256, le=MAX_IMAGE_SIDE, multiple_of=64,
        description="Tile side in pixels when vae_tiling is on; smaller tiles, smaller VAE peak.",
    )
    vae_slicing: bool = Field(description="Decode a batch one image at a time (VAE peak per image, not per batch).")
    attention: Literal["sdpa", "xformers", "flash"] = Field(
        "sdpa",
        description="Attention backend through diffusers' dispatcher; falls back to sdpa, with a log line, when the "
        "package is not installed.",
    )
    alloc_conf: str | None = Field(
        None,
        description="PYTORCH_CUDA_ALLOC_CONF for this process, e.g. 'expandable_segments:True' (less fragmentation "
        "when image sizes vary).",
    )
    max_memory_gb: float | None = Field(
        None, gt=0,
        description="Cap on this process's CUDA memory in GiB (torch.cuda.set_per_process_memory_fraction), like the "
        "seed's --max-memory; also emulates a smaller card on a larger one.",
    )
    max_pixels: int = Field(
        MAX_IMAGE_SIDE * MAX_IMAGE_SIDE, ge=MIN_IMAGE_SIDE * MIN_IMAGE_SIDE, description="Largest width x height."
    )
    max_n: int = Field(4, ge=1, le=16, description="Most images in one pipeline call; larger n is split.")
    max_steps: int = Field(50, ge=1, le=50, description="Most denoising steps per request.")
    lora_params: int = Field(
        0, ge=0,
        description="Parameters of the LoRA adapters a replica may hold at once (its adapter slots x the largest "
        "adapter; set from the service's LoRA folder, deployments/lora.py). Counted with the transformer's weights, "
        "in the compute dtype.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        if self.weights == "fp8_layerwise" and self.storage_dtype not in (None, "float8_e4m3fn"):
            raise ValueError(
                f"weights='fp8_layerwise' stores in float8_e4m3fn; got storage_dtype={self.storage_dtype!r} "
                "(use weights='resident' with that storage_dtype instead)"
            )
        if self.weights in ACCELERATOR_ONLY_PLACEMENTS and self.text_encoder not in ("offload", "stage"):
            raise ValueError(
                f"weights={self.weights!r} offloads every component, the text encoder included; "
                f"text_encoder={self.text_encoder!r} contradicts it (use text_encoder='offload', or 'stage')"
            )
        return self

    @property
    def transformer_storage(self) -> str:
        """The dtype the transformer's weights are stored in."""
        if self.storage_dtype is not None:
            return self.storage_dtype
        return "float8_e4m3fn" if self.weights == "fp8_layerwise" else self.compute_dtype

    @property
    def text_encoder_storage(self) -> str:
        """The text encoder's storage dtype: the transformer's, except that fp8 becomes bf16 (Qwen3 in fp8 is
        untested here) when computing in float32, and the compute dtype otherwise."""
        storage = self.transformer_storage
        if storage != "float8_e4m3fn":
            return storage
        return "bfloat16" if self.compute_dtype == "float32" else self.compute_dtype

    def technique(self) -> str:
        """One line for tables: '<compute> compute, <placement>, <text encoder>, VAE ...'."""
        placement = {
            "resident": "resident", "fp8_layerwise": "fp8 resident", "group_offload_block": "block offload",
            "group_offload_leaf": "leaf offload", "model_cpu_offload": "model CPU offload",
            "sequential_cpu_offload": "sequential offload",
        }[self.weights]
        storage = self.transformer_storage
        if storage != self.compute_dtype and self.weights != "fp8_layerwise":
            placement += f" ({_short(storage)} storage)"
        parts = [f"{_short(self.compute_dtype)}", placement, f"TE {self.text_encoder}"]
        if self.vae_tiling:
            parts.append(f"VAE tiles {self.vae_tile_px}")
        if self.vae_slicing:
            parts.append("sliced")
        return ", ".join(parts)


def _short(dtype: str) -> str:
    return {"float8_e4m3fn": "fp8", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]


# Placement, VAE tile, and batch limit per VRAM tier. Why each: see the module docstring and docs/memory.md.
# vram_12/16 hold the fp8 transformer (6.2 GB) resident; vram_8 does not (6.2 GB + context + activations is above
# 7.5 GiB), so it streams blocks; vram_4 streams single layers because one fp32-upcast block alone is 0.7 GB.
_TIER_PLACEMENT: dict[str, dict[str, Any]] = {
    "vram_24": {"weights": "resident", "vae_tile_px": 1024, "max_n": 4},
    "vram_16": {"weights": "fp8_layerwise", "vae_tile_px": 1024, "max_n": 4},
    "vram_12": {"weights": "fp8_layerwise", "vae_tile_px": 1024, "max_n": 4},
    "vram_8": {"weights": "group_offload_block", "storage_dtype": "float8_e4m3fn", "vae_tile_px": 768, "max_n": 2},
    "vram_6": {"weights": "group_offload_block", "storage_dtype": "bfloat16", "vae_tile_px": 512, "max_n": 2},
    "vram_4": {"weights": "group_offload_leaf", "storage_dtype": "bfloat16", "vae_tile_px": 512, "max_n": 1},
}


def shipped_tier_for(gib: float) -> str:
    """The shipped tier whose profile a configured tier of `gib` GiB runs: the largest shipped tier at or below that
    size (a 10 GB tier runs vram_8's techniques), or the smallest shipped one for a tier below all of them."""
    return classify(int(gib * GIB), VRAM_TIERS_GIB, margin=0.0) or min(VRAM_TIERS_GIB, key=VRAM_TIERS_GIB.get)


def default_profile(tier: str, bf16: bool) -> Profile:
    """The shipped profile of `tier` for a card with (bf16=True) or without bf16 support.

    Algorithm: take the tier's placement from the table above; compute in bfloat16 when the card has it, else in
    float32 with the weights kept in bf16 (vram_24, which would otherwise need 24.6 GB of float32 weights) or in the
    tier's storage dtype and upcast layer by layer. The 'cpu' tier runs everything resident in float32 (bf16 is
    ignored there). A tier of the configured table ($ZIT_VRAM_TIERS_GB) that ships no profile (vram_10) takes the
    placement of `shipped_tier_for` its size, under its own name; its budget (cluster.tiers.tier_vram_bytes, or its
    smallest card's memory) is its own, so the memory model's limits follow its real size. Raises ProfileError for
    a tier in neither table, naming the known ones.
    """
    if tier == CPU_TIER:
        return Profile(
            name=CPU_TIER, compute_dtype="float32", weights="resident", text_encoder="gpu", offload_stream=False,
            vae_tiling=True, vae_slicing=True, max_n=4,
        )
    if tier not in _TIER_PLACEMENT:
        configured = vram_tiers()
        if tier not in configured:
            known = [*dict.fromkeys([*VRAM_TIERS_GIB, *configured]), CPU_TIER]
            raise ProfileError(f"unknown tier {tier!r}; known tiers: {known} (more with {ZIT_VRAM_TIERS_GB_ENV} or "
                               "--tiers)")
        knobs = dict(_TIER_PLACEMENT[shipped_tier_for(configured[tier])])
    else:
        knobs = dict(_TIER_PLACEMENT[tier])
    compute = "bfloat16" if bf16 else "float32"
    if not bf16 and knobs["weights"] == "resident":
        knobs["storage_dtype"] = "bfloat16"
    if not bf16:  # a float32 decode needs twice the bytes per pixel: halve the tile area (at most 512 x 512)
        knobs["vae_tile_px"] = min(knobs["vae_tile_px"], 512)
    if knobs.get("storage_dtype") == compute:
        knobs["storage_dtype"] = None
    return Profile(
        name=tier if bf16 else f"{tier}-fp32",
        compute_dtype=compute,
        text_encoder="offload",
        vae_tiling=True,
        vae_slicing=True,
        # Fewer allocator segments stranded between requests of different sizes; harmless where unused.
        alloc_conf="expandable_segments:True",
        **knobs,
    )


def resolve_profile(tier: str, bf16: bool, overrides: dict | None = None) -> Profile:
    """The tier's default profile with an operator's overrides applied and validated.

    Fails with ProfileError when an override names a knob that does not exist (listing the knobs), when a value is
    invalid (pydantic's reason, with the knob), or when it asks for bf16/fp16 compute on a card without bf16.
    """
    base = default_profile(tier, bf16)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(Profile.model_fields))
    if unknown:
        raise ProfileError(
            f"unknown profile knob(s) {unknown} for tier {tier!r}; known knobs: {sorted(Profile.model_fields)}"
        )
    try:
        profile = Profile.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        raise ProfileError(f"invalid profile override for tier {tier!r}: {exc}") from exc
    if not bf16 and tier != CPU_TIER and profile.compute_dtype != "float32":
        raise ProfileError(
            f"compute_dtype={profile.compute_dtype!r} on a card without bf16 support (tier {tier!r}): "
            "float16 gives NaN or black images with Z-Image-Turbo and bfloat16 is not supported by the card; "
            "use compute_dtype='float32' (weights can stay stored in bf16 or fp8 with storage_dtype)"
        )
    return profile


def tier_profile(tier: TierConfig, lora_params: int = 0) -> Profile:
    """The profile a tier's replicas run: the tier's default for its cards' bf16 support, plus overrides, plus the
    LoRA adapters its replicas may hold (`lora_params`, deployments/lora.py)."""
    overrides = dict(tier.profile or {})
    if tier.dtype != "auto":  # the tier's `dtype` is the profile's compute_dtype, checked the same way
        overrides.setdefault("compute_dtype", tier.dtype)
    profile = resolve_profile(tier.name if tier.device == "cuda" else "cpu", tier.bf16, overrides or None)
    return profile.model_copy(update={"lora_params": lora_params}) if lora_params else profile


def apply_profile(pipe: "ZImagePipeline", profile: Profile, device: str) -> None:
    """Load `profile` into `pipe` (loaded on the CPU, any dtype) for running on `device`.

    Steps: 1. allocator settings (before the first CUDA allocation matters); 2. compute dtype for every component;
    3. layerwise casting of the transformer / text encoder to their storage dtypes; 4. placement of each component
    (resident, group offload, model or sequential CPU offload, text encoder on the CPU through an accelerate hook);
    5. VAE tiling and slicing; 6. attention backend.

    On a device without streams, offload_stream is ignored and logged; on a CPU device the CUDA-only allocator knobs
    are skipped and logged; model_cpu_offload and sequential_cpu_offload raise ProfileError (their hooks need an
    accelerator to move weights to, and pretending would make the memory model's prediction wrong). An attention
    backend that is not installed falls back to sdpa with a warning. Components loaded from the weights cache in the
    profile's dtypes (`cluster.pipeline.load_pipeline` with the profile) are not cast again, so no float32 copy of a
    bf16-stored component is ever made; others are cast whole to the compute dtype first.
    """
    import torch

    on_cuda = torch.device(device).type == "cuda"
    # 1. Allocator settings: only CUDA has them.
    _apply_allocator(profile, device, on_cuda)
    if profile.weights in ACCELERATOR_ONLY_PLACEMENTS and not on_cuda:
        raise ProfileError(
            f"profile {profile.name!r}: weights={profile.weights!r} needs a CUDA device (got {device!r}); "
            "on the CPU use weights='resident' or 'group_offload_block'"
        )
    use_stream = profile.offload_stream and on_cuda
    if profile.offload_stream and not on_cuda and _offloads(profile):
        logger.info("profile %s: offload_stream ignored on %s (streams need a CUDA device)", profile.name, device)

    # 2 and 3. Every component computes in one dtype, and layerwise casting stores the transformer's and the text
    #    encoder's leaves small, each upcast for its own forward (diffusers hooks).
    _cast(pipe.transformer, "transformer", profile.transformer_storage, profile.compute_dtype)
    _cast(pipe.text_encoder, "text_encoder", profile.text_encoder_storage, profile.compute_dtype)
    _cast(pipe.vae, "vae", profile.compute_dtype, profile.compute_dtype)
    # 4. Placement.
    _place(pipe, profile, torch.device(device), use_stream)
    # 5. VAE tiling and slicing.
    apply_vae(pipe, profile)
    # 6. Attention backend.
    _apply_attention(pipe, profile)


def apply_text_encoder_profile(pipe: "ZImagePipeline", profile: Profile, device: str) -> None:
    """Load the text-encoder stage's `profile` (cluster/stages.py stage_profile) into `pipe`, a pipeline of only a
    tokenizer and a text encoder loaded on the CPU, for encoding on `device`: the allocator, the compute dtype,
    bf16 storage cast layer by layer when computing in float32 (the embedding stays in the compute dtype), and the
    encoder resident, offloaded or on the CPU. The same steps as `apply_profile`'s for a generator's encoder."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    _apply_allocator(profile, device, on_cuda)
    _cast(pipe.text_encoder, "text_encoder", profile.text_encoder_storage, profile.compute_dtype)
    if profile.text_encoder != "cpu":
        _place_text_encoder(pipe.text_encoder, profile, torch.device(device), profile.offload_stream and on_cuda)


def _cast(module, component: str, storage: str, compute: str) -> None:
    """`module` computing in `compute`, its leaves stored in `storage` (cluster.weights.layerwise_cast). A component
    loaded from the weights cache in exactly these dtypes (`cluster.weights.load_component`) is not cast again: its
    tensors stay views of the host's one stored copy; only the hooks are attached (diffusers finds the leaves in
    the storage dtype already). Any other is cast whole to `compute` first, then stored small leaf by leaf."""
    import torch

    from cluster.weights import layerwise_cast

    if module is None:  # no encoder in a pipeline whose encoder is the stage
        return
    if getattr(module, "_zit_stored", None) != (storage, compute):
        module.to(dtype=getattr(torch, compute))
    if storage != compute:
        layerwise_cast(component, module, getattr(torch, storage), getattr(torch, compute))


def apply_vae(pipe: "ZImagePipeline", profile: Profile) -> None:
    """VAE tiles of vae_tile_px pixels (the AutoencoderKL attributes enable_tiling reads), one image at a time."""
    if profile.vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = profile.vae_tile_px
        pipe.vae.tile_latent_min_size = profile.vae_tile_px // pipe.vae_scale_factor
    else:
        pipe.vae.disable_tiling()
    if profile.vae_slicing:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()


# The smallest VAE tile a degraded retry goes down to: below it the tile seams show and the saving is small.
MIN_DEGRADED_TILE_PX = 256


def degraded_profile(profile: Profile) -> Profile | None:
    """The profile an out-of-memory retry runs with on the same card: VAE tiled and sliced; when it already was,
    with tiles half as large (down to MIN_DEGRADED_TILE_PX).

    None when there is nothing left to degrade (then the work must go to a larger card).
    """
    tile = max(MIN_DEGRADED_TILE_PX, profile.vae_tile_px // 2) if profile.vae_tiling else profile.vae_tile_px
    if profile.vae_tiling and profile.vae_slicing and tile == profile.vae_tile_px:
        return None
    return profile.model_copy(update={"name": f"{profile.name}-degraded", "vae_tiling": True, "vae_slicing": True,
                                      "vae_tile_px": tile})


def _offloads(profile: Profile) -> bool:
    return profile.weights.startswith("group_offload") or profile.text_encoder == "offload"


def _apply_allocator(profile: Profile, device: str, on_cuda: bool) -> None:
    import torch

    if not on_cuda:
        if profile.alloc_conf or profile.max_memory_gb:
            logger.info("profile %s: alloc_conf/max_memory_gb skipped on %s (CUDA allocator only)", profile.name, device)
        return
    if profile.alloc_conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = profile.alloc_conf
        if torch.cuda.is_initialized():  # the variable is read once; change the live allocator as well
            torch.cuda.memory._set_allocator_settings(profile.alloc_conf)
    if profile.max_memory_gb:
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(1.0, profile.max_memory_gb * (1 << 30) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, index)


def _place(pipe, profile: Profile, device, use_stream: bool) -> None:
    import torch

    cpu = torch.device("cpu")
    if profile.weights == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
        return
    if profile.weights == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
        return
    pipe.vae.to(device)
    if profile.weights in ("resident", "fp8_layerwise"):
        pipe.transformer.to(device)
    else:
        level = "block_level" if profile.weights == "group_offload_block" else "leaf_level"
        pipe.transformer.enable_group_offload(
            onload_device=device, offload_device=cpu, offload_type=level,
            num_blocks_per_group=1 if level == "block_level" else None, use_stream=use_stream,
            low_cpu_mem_usage=True,  # no pinned private copy: see _place_text_encoder
        )
    if pipe.text_encoder is not None:  # none in a pipeline whose encoder is the stage (text_encoder='stage')
        _place_text_encoder(pipe.text_encoder, profile, device, use_stream)


def _place_text_encoder(text_encoder, profile: Profile, device, use_stream: bool) -> None:
    """The text encoder resident on `device` ('gpu'), group-offloaded onto it block by block ('offload'), or kept on
    the CPU with accelerate moving its inputs and outputs ('cpu')."""
    import torch
    from diffusers.hooks import apply_group_offloading

    cpu = torch.device("cpu")
    if profile.text_encoder == "gpu":
        text_encoder.to(device)
    elif profile.text_encoder == "offload":
        # low_cpu_mem_usage: the offloaded weights stay where they were loaded, views of the host's one stored copy
        # (cluster/weights.py), and each group is pinned as it is sent; the default pins a private copy of every
        # weight up front, rounded up to a power of two by PyTorch's pinned allocator (x1.4-1.5 here), per replica.
        apply_group_offloading(
            text_encoder, onload_device=device, offload_device=cpu, offload_type="block_level",
            num_blocks_per_group=1, use_stream=use_stream, low_cpu_mem_usage=True,
        )
    else:  # cpu: accelerate moves the prompt to the CPU and the embeddings back to the pipeline's device
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        text_encoder.to(cpu)
        add_hook_to_module(text_encoder, AlignDevicesHook(execution_device=cpu, io_same_device=True))


def _apply_attention(pipe, profile: Profile) -> None:
    backend = _ATTENTION_BACKENDS[profile.attention]
    if backend == "native":
        return  # diffusers' default already is PyTorch SDPA
    try:
        pipe.transformer.set_attention_backend(backend)
    except (RuntimeError, ImportError, ValueError) as exc:
        logger.warning("profile %s: attention %r unavailable (%s); using sdpa", profile.name, profile.attention, exc)
        pipe.transformer.set_attention_backend("native")
