"""Find, fetch and load the Z-Image-Turbo pipeline; run one generation job on it.

A model spec is one of:
- 'tiny': the tiny random-weight model (built offline on first use, see tiny_model.py);
- a local folder in diffusers format (model_index.json at its top);
- the ModelScope id 'Tongyi-MAI/Z-Image-Turbo', served from the folder `zit download` filled.
All three load through `ZImagePipeline.from_pretrained`.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from cluster.paths import cache_dir
from cluster.tiny_model import ensure_tiny_model

if TYPE_CHECKING:
    import torch
    from diffusers import ZImagePipeline

    from cluster.profiles import Profile
    from cluster.requests import GenerationJob

# The ModelScope repository of the real weights.
REAL_MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"

# How long `zit download` waits for the hub to answer before it says the machine is offline. ModelScope's own retries
# take about 22 s to give up; a plain TCP connect tells the same in well under a second when there is no route.
DOWNLOAD_CONNECT_TIMEOUT_S = 5.0


class ModelNotFound(RuntimeError):
    """The model spec names nothing that can be loaded; the message says how to get it."""


class DownloadFailed(RuntimeError):
    """The download could not run; the message gives the manual command."""


def models_dir() -> Path:
    return cache_dir() / "models"


def default_download_dir(model_id: str = REAL_MODEL_ID) -> Path:
    return models_dir() / model_id


def resolve_model(spec: str) -> Path:
    """Turn a model spec into a folder holding model_index.json, building the tiny model if that is what is asked."""
    if spec == "tiny":
        return ensure_tiny_model(models_dir())
    folder = Path(spec).expanduser()
    if (folder / "model_index.json").is_file():
        return folder
    if spec == REAL_MODEL_ID or spec.count("/") == 1 and not folder.exists():
        downloaded = default_download_dir(spec)
        if (downloaded / "model_index.json").is_file():
            return downloaded
        raise ModelNotFound(
            f"model {spec!r} is not downloaded yet: run `zit download --model {spec}` "
            f"(it fills {downloaded}), or pass --model PATH to a diffusers-format folder"
        )
    if folder.exists():
        raise ModelNotFound(f"{folder} has no model_index.json: it is not a diffusers-format Z-Image-Turbo folder")
    raise ModelNotFound(f"model {spec!r} not found: use 'tiny', a local folder, or {REAL_MODEL_ID!r}")


def load_pipeline(folder: Path, device: str = "cpu", dtype: "torch.dtype | None" = None,
                  text_encoder: bool = True, profile: "Profile | None" = None) -> "ZImagePipeline":
    """Load a diffusers-format folder onto `device`: under `profile`, each component in the dtypes it runs in (the
    transformer's and the encoder's leaves in their storage dtypes, the rest in the compute dtype; `apply_profile`
    then only attaches hooks), else everything in `dtype` (float32 when None). Each component is a view of the
    host's one stored copy (cluster/weights.py; a missing copy is written first, logged shard by shard). Without
    `text_encoder` the pipeline has neither encoder nor tokenizer (the text-encoder stage encodes for it): they are
    not even read."""
    import torch
    from diffusers import ZImagePipeline

    from cluster.weights import load_component

    compute = getattr(torch, profile.compute_dtype) if profile else dtype or torch.float32
    storage = (lambda name: getattr(torch, name)) if profile else (lambda name: compute)  # noqa: E731
    parts = {
        "transformer": load_component(folder, "transformer",
                                      storage(profile.transformer_storage if profile else ""), compute),
        "vae": load_component(folder, "vae", compute, compute),
    }
    if text_encoder:
        parts["text_encoder"] = load_component(
            folder, "text_encoder", storage(profile.text_encoder_storage if profile else ""), compute)
    else:
        parts.update(text_encoder=None, tokenizer=None)
    pipe = ZImagePipeline.from_pretrained(folder, dtype=compute, **parts)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text_encoder(folder: Path, device: str = "cpu", dtype: "torch.dtype | None" = None,
                      profile: "Profile | None" = None) -> "ZImagePipeline":
    """The text-encoder stage's pipeline: the folder's tokenizer and text encoder only (no transformer, no VAE), on
    `device`, in the stage `profile`'s dtypes (else all in `dtype`, float32 when None), a view of the host's stored
    copy as in `load_pipeline`; it encodes with the pipeline's own `encode_prompt`."""
    import torch
    from diffusers import ZImagePipeline

    from cluster.weights import load_component

    compute = getattr(torch, profile.compute_dtype) if profile else dtype or torch.float32
    storage = getattr(torch, profile.text_encoder_storage) if profile else compute
    encoder = load_component(folder, "text_encoder", storage, compute)
    pipe = ZImagePipeline.from_pretrained(folder, dtype=compute, transformer=None, vae=None, text_encoder=encoder)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class BadImages(RuntimeError):
    """The pipeline produced NaN or all-black images."""


# An image whose brightest pixel is at most this (of 255) is black: what NaN latents decode to.
BLACK_MAX_LEVEL = 2


def run_job(
    pipe: "ZImagePipeline",
    job: "GenerationJob",
    on_step: Callable[[int, int], None] | None = None,
    latents_hook: Callable | None = None,
) -> tuple[list[bytes], float]:
    """Generate the images of `job` and return them encoded, with the seconds the pipeline call took.

    Image i is drawn from its own generator seeded with job.seeds[i], on the CPU, so the same seed gives the same
    image whether it is generated alone, in a batch, or on another replica. `latents_hook` sees the latents after
    every step (a simulated faulty card uses it). Raises BadImages when an image comes out all black (NaN latents).
    """
    import numpy as np
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]

    def step_end(pipeline, step: int, timestep, kwargs: dict) -> dict:
        if latents_hook is not None:
            kwargs["latents"] = latents_hook(kwargs["latents"])
        if on_step is not None:
            on_step(step + 1, job.steps)
        return kwargs

    if job.encoded is not None:  # the stage encoded the request: no prompt, its embeddings
        # In the pipeline's compute dtype, which its VAE keeps (the transformer may be stored in fp8).
        prompt_embeds, negative_embeds = job.encoded.for_pipeline(pipe.vae.dtype, pipe._execution_device)
        text = {"prompt": None, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    else:
        text = {"prompt": job.prompt, "negative_prompt": job.negative_prompt if job.guidance_scale > 0 else None}
    started = time.perf_counter()
    output = pipe(
        **text,
        height=job.height,
        width=job.width,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        num_images_per_prompt=len(job.seeds),
        generator=generators,
        callback_on_step_end=step_end,
    )
    seconds = time.perf_counter() - started
    black = [seed for seed, image in zip(job.seeds, output.images) if np.asarray(image).max() <= BLACK_MAX_LEVEL]
    if black:
        raise BadImages(f"seeds {black} came out all black (NaN latents)")
    return [encode_image(image, job.output_format, job.quality) for image in output.images], seconds


def encode_image(image, fmt: str, quality: int | None = None) -> bytes:
    """PIL image -> PNG / JPEG / WebP bytes."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=quality if quality is not None else 90)
    return buffer.getvalue()


def _hub_reachable(endpoint: str, timeout_s: float) -> str | None:
    """None when a TCP connection to the hub opens, else why not."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or endpoint
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"cannot reach {endpoint} ({exc.__class__.__name__}: {exc})"


def _hub_proxy(endpoint: str) -> str | None:
    """The proxy the hub client's HTTP library (requests) sends `endpoint` through: HTTPS_PROXY, HTTP_PROXY or
    ALL_PROXY for its scheme, unless NO_PROXY covers its host; None when it connects directly."""
    from requests.utils import get_environ_proxies, select_proxy

    return select_proxy(endpoint, get_environ_proxies(endpoint))


def download_model(model_id: str = REAL_MODEL_ID, local_dir: Path | None = None) -> Path:
    """Fetch `model_id` from ModelScope into `local_dir` with its per-file progress bars; return the folder.

    Offline, it fails within DOWNLOAD_CONNECT_TIMEOUT_S with DownloadFailed naming the manual command, instead of
    sitting through the hub client's retries. Behind a proxy (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY) that quick check
    is skipped, since a direct connection says nothing about the proxied one: the hub client's own error, after its
    retries, comes with the manual command instead. The endpoint is ModelScope's own setting (MODELSCOPE_ENDPOINT).
    """
    from modelscope import snapshot_download
    from modelscope_hub.config import HubConfig

    target = Path(local_dir or default_download_dir(model_id)).expanduser()
    manual = f"modelscope download --model {model_id} --local_dir {target}"
    endpoint = HubConfig().endpoint
    problem = None if _hub_proxy(endpoint) else _hub_reachable(endpoint, DOWNLOAD_CONNECT_TIMEOUT_S)
    if problem:
        raise DownloadFailed(
            f"{problem}. This machine looks offline. Download on a connected machine with\n  {manual}\n"
            f"then copy the folder here and serve it with `zit up --model {target}`."
        )
    target.mkdir(parents=True, exist_ok=True)
    try:
        folder = snapshot_download(model_id, local_dir=str(target))
    except Exception as exc:  # the hub client raises many unrelated types; all mean the same to the user
        raise DownloadFailed(f"download of {model_id} failed: {exc}\nRetry, or run by hand:\n  {manual}") from exc
    if not (Path(folder) / "model_index.json").is_file():
        raise DownloadFailed(f"{folder} has no model_index.json after download; is {model_id} a diffusers repo?")
    return Path(folder)
