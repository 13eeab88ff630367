"""Request and response models of the HTTP API (OpenAI Images shape plus extensions)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from cluster.tiers import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The pipeline works on 16-pixel cells (VAE factor 8 x patch 2).
SIZE_MULTIPLE = 16
MAX_SEED = 2**32 - 1


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


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. Unknown fields are rejected by name; OpenAI-only fields are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(None, description="Served model name (see /v1/models); default: the served model.")
    # Integer fields are strict (as in a1111.py): JSON true would otherwise pass as 1 and false as 0.
    n: int = Field(1, ge=1, le=10, strict=True, description="Number of images, 1..10.")
    size: str = Field("1024x1024", description="'WxH', each side a multiple of 16 between 64 and 2048.")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="Inline base64 or a URL to GET.")
    user: str | None = Field(None, max_length=256, description="End-user id (accepted for compatibility, unused).")
    # Extensions.
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True,
                             description="Seed of the first image; image i uses seed + i.")
    steps: int = Field(9, ge=1, le=50, strict=True, description="Denoising steps (Z-Image-Turbo is tuned for 9).")
    negative_prompt: str | None = Field(None, description="What to avoid (only used when guidance_scale > 0).")
    guidance_scale: float = Field(0.0, ge=0.0, le=20.0, description="Classifier-free guidance; 0 for Turbo.")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    # OpenAI fields that have no meaning here: accepted so existing clients work, then ignored.
    quality: str | None = Field(None, description="Ignored (OpenAI compatibility).")
    style: str | None = Field(None, description="Ignored (OpenAI compatibility).")
    background: str | None = Field(None, description="Ignored (OpenAI compatibility).")
    moderation: str | None = Field(None, description="Ignored (OpenAI compatibility).")
    output_compression: int | None = Field(None, ge=0, le=100, strict=True, description="JPEG/WebP quality, 0..100.")
    lora: str | None = Field(
        None, max_length=128,
        description="Name of a LoRA adapter in the service's LoRA folder (GET /v1/loras); none by default.",
    )
    lora_scale: float = Field(1.0, ge=-2.0, le=2.0, description="Strength of the LoRA adapter, -2..2.")
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="Queue order on a busy tier: interactive requests go before batch ones."
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        if "\x00" in prompt:
            raise ValueError("prompt must not contain NUL characters")
        return prompt

    @field_validator("size")
    @classmethod
    def _size_parses(cls, size: str) -> str:
        width, height = parse_size(size)
        return f"{width}x{height}"

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    # Set by the ingress, never by a client: the id this request's progress is filed under (deployments/progress.py).
    _request_id: str | None = PrivateAttr(None)

    @property
    def request_id(self) -> str | None:
        return self._request_id

    @request_id.setter
    def request_id(self, value: str | None) -> None:
        self._request_id = value


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="Seed that reproduces this image.")


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    metadata: dict = Field(default_factory=dict, description="Tiers, chunks and timings (extension).")


class GenerationJob(BaseModel):
    """One chunk of a request as a Generator replica runs it: images for seeds[0], seeds[1], ... in one call."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
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
