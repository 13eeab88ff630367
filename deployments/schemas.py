"""Request and response models of the HTTP API (OpenAI Images shape plus extensions)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from cluster.requests import parse_size

MAX_SEED = 2**32 - 1


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


def image_generation_body(created: int, items: list[tuple[str, bytes | str, int]], metadata: dict) -> bytes:
    """The JSON of an ImageGenerationResponse, written once: `items` are (field, value, seed) with field "b64_json"
    (value: base64 bytes, whose alphabet needs no JSON escaping) or "url". An image's megabytes are copied into the
    body once, never parsed, validated or escaped (tests/unit/deployments/test_schemas.py checks the shape against
    the model)."""
    parts = [b'{"created":%d,"data":[' % created]
    for i, (field, value, seed) in enumerate(items):
        comma = b"," if i else b""
        if field == "b64_json":  # the megabytes are joined below, once
            parts += [comma + b'{"b64_json":"', value, b'","seed":%d}' % seed]
        else:
            parts.append(comma + b'{"url":%s,"seed":%d}' % (json.dumps(value).encode(), seed))
    parts.append(b'],"metadata":' + json.dumps(metadata, separators=(",", ":")).encode() + b"}")
    return b"".join(parts)
