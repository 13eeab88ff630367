"""Request shapes every layer shares: an image size, the work of a chunk, and the job a Generator replica runs with
the result it returns (the contract between the ingress and a replica)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.encoding import EncodedPrompt
from cluster.memory import image_tokens, transformer_batch
from cluster.tiers import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The pipeline works on 16-pixel cells (VAE factor 8 x patch 2).
SIZE_MULTIPLE = 16


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height), or ValueError saying what to change."""
    match = SIZE_RE.match(size.strip().lower())
    if not match:
        raise ValueError(f"size must look like '1024x1024' (width x height in pixels); got {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    for side, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE:
            lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise ValueError(
                f"{side} must be a multiple of {SIZE_MULTIPLE}; got {value} (try {lower} or {lower + SIZE_MULTIPLE})"
            )
        if not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE:
            raise ValueError(f"{side} must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}; got {value}")
    return width, height


# Prompt tokens the pipeline pads every prompt to: part of each image's work.
PROMPT_TOKENS = 512


def work_units(width: int, height: int, n: int, steps: int, cfg: bool = False) -> float:
    """A chunk's work: image tokens (with the prompt's) x images x steps, twice that with classifier-free guidance
    (`cfg`: every step runs the transformer on each image and its negative-prompt twin)."""
    return float((image_tokens(width, height) + PROMPT_TOKENS) * transformer_batch(n, cfg) * steps)


class GenerationJob(BaseModel):
    """One chunk of a request as a Generator replica runs it: images for seeds[0], seeds[1], ... in one call."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    prompt: str
    negative_prompt: str | None = None
    encoded: EncodedPrompt | None = Field(
        None, description="The request's embeddings from the text-encoder stage; the replica then runs no encoder "
        "(None: it encodes the prompt itself).")
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: list[int] = Field(min_length=1)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int | None = None
    predicted_peak: int = Field(0, ge=0, description="Bytes the memory model predicts on the tier's card; 0 unknown.")
    request_id: str | None = Field(None, description="The request's progress id; replicas report steps under it.")
    lora: str | None = Field(None, description="LoRA adapter name (checked by the ingress); also the multiplexed id.")
    lora_scale: float = 1.0
    tier_queue: tuple[int, float] | None = Field(
        None, description="Chunks (and their work units) waiting for this tier when the job left the ingress; the "
        "replica reports them to the tier's autoscaler.")


class GenerationResult(BaseModel):
    """What a replica returns for one job: encoded images in seed order, and where and how fast they were made."""

    images: list[bytes]
    seeds: list[int]
    tier: str
    replica: str
    device: str
    seconds: float
    seconds_per_step: float
    degraded: bool = False
