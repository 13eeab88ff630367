"""The AUTOMATIC1111 web UI API (`/sdapi/v1/...`), for the image clients that speak it.

A mixin of the Ingress: `POST /sdapi/v1/txt2img` turns the A1111 request into an ImageGenerationRequest and calls
`Ingress.generate`, the one path every API takes to images (same limits, admission, tier choice and retries).

Fields, decided once here:
- used: prompt (with at most one `<lora:name:weight>` tag, A1111's LoRA syntax: the tag is taken out of the prompt
  and the adapter applied, see deployments/lora.py), negative_prompt, seed (-1 = random), steps, cfg_scale, width, height, batch_size, n_iter
  (n = batch_size x n_iter, image i gets seed + i as in A1111), send_images, force_task_id (the id
  `/sdapi/v1/progress` and `/internal/progress` report under);
- cfg_scale: A1111 mixes `uncond + cfg x (cond - uncond)`, Z-Image `cond + g x (cond - uncond)`, so
  guidance_scale = cfg_scale - 1 (cfg_scale 1, the default here, is Turbo's guidance 0; below 1 counts as 1);
- accepted and ignored: the sampler, scheduler and sampler-noise settings (Z-Image-Turbo has one flow-matching Euler
  sampler), restore_faces, tiling, saving flags, subseeds, override_settings, the hires-fix settings and every other
  field of A1111's (and Forge's) schema, null as well, as there;
- rejected with 422, because ignoring them would silently give another picture than asked for: enable_hr=true (hires
  fix), script_name, non-empty alwayson_scripts (extensions such as ControlNet), non-empty styles (stored on an A1111
  server, unknown here); and any field A1111 does not have, by name.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.requests import SIZE_MULTIPLE
from cluster.tiers import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
from deployments.http import ApiError, api
from deployments.lora import LoraError, parse_prompt_loras
from deployments.schemas import MAX_SEED, ImageGenerationRequest

# What `sampler_name` reports: Z-Image-Turbo's FlowMatchEulerDiscreteScheduler is an Euler sampler.
SAMPLER = "Euler"
SCHEDULER = "Simple"
_IGNORED = "Accepted for A1111 compatibility and ignored."


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img, A1111's StableDiffusionProcessingTxt2Img fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="What to draw.")
    negative_prompt: str = Field("", description="What to avoid (used when cfg_scale > 1).")
    # The integers this service uses are strict, as in schemas.py: JSON true would otherwise pass as 1.
    seed: int = Field(-1, ge=-1, le=MAX_SEED, strict=True,
                      description="Seed of the first image; -1 picks one at random.")
    steps: int = Field(9, ge=1, le=50, strict=True,
                       description="Denoising steps (A1111 defaults to 50; Turbo is tuned for 9).")
    cfg_scale: float = Field(1.0, ge=0.0, le=21.0, description="A1111 CFG scale; guidance_scale = cfg_scale - 1.")
    width: int = Field(512, strict=True, description=f"Width in pixels, a multiple of {SIZE_MULTIPLE}.")
    height: int = Field(512, strict=True, description=f"Height in pixels, a multiple of {SIZE_MULTIPLE}.")
    batch_size: int = Field(1, ge=1, le=10, strict=True, description="Images per batch.")
    n_iter: int = Field(1, ge=1, le=10, strict=True, description="Batches; n = batch_size x n_iter.")
    send_images: bool = Field(True, description="Return the images (false: an empty list, like A1111).")
    save_images: bool | None = Field(False, description=_IGNORED + " Nothing is saved on the server.")
    force_task_id: str | None = Field(None, max_length=128, description="Task id the progress endpoints report.")
    # Rejected when set (see the module docstring); null is not set.
    enable_hr: bool | None = Field(False, description="Hires fix: not supported, must be false.")
    script_name: str | None = Field(None, description="A1111 scripts: not supported, must be empty.")
    alwayson_scripts: dict | None = Field(default_factory=dict, description="Extensions: not supported, must be empty.")
    styles: list[str] | None = Field(default_factory=list, description="Saved styles: not supported, must be empty.")
    # Accepted and ignored: every other field of A1111's txt2img API model, and Forge's. That model makes every field
    # optional, so these accept null as well.
    sampler_name: str | None = Field(None, description=_IGNORED)
    sampler_index: str | None = Field(None, description=_IGNORED)
    scheduler: str | None = Field(None, description=_IGNORED)
    restore_faces: bool | None = Field(None, description=_IGNORED)
    tiling: bool | None = Field(None, description=_IGNORED)
    do_not_save_samples: bool | None = Field(False, description=_IGNORED)
    do_not_save_grid: bool | None = Field(False, description=_IGNORED)
    subseed: int | None = Field(-1, description=_IGNORED)
    subseed_strength: float | None = Field(0.0, description=_IGNORED)
    seed_resize_from_h: int | None = Field(-1, description=_IGNORED)
    seed_resize_from_w: int | None = Field(-1, description=_IGNORED)
    eta: float | None = Field(None, description=_IGNORED)
    s_min_uncond: float | None = Field(None, description=_IGNORED)
    s_churn: float | None = Field(None, description=_IGNORED)
    s_tmax: float | None = Field(None, description=_IGNORED)
    s_tmin: float | None = Field(None, description=_IGNORED)
    s_noise: float | None = Field(None, description=_IGNORED)
    clip_skip: int | None = Field(None, description=_IGNORED)
    distilled_cfg_scale: float | None = Field(None, description=_IGNORED)
    denoising_strength: float | None = Field(None, description=_IGNORED)
    override_settings: dict[str, Any] | None = Field(default_factory=dict, description=_IGNORED)
    override_settings_restore_afterwards: bool | None = Field(True, description=_IGNORED)
    refiner_checkpoint: str | None = Field(None, description=_IGNORED)
    refiner_switch_at: float | None = Field(None, description=_IGNORED)
    disable_extra_networks: bool | None = Field(False, description=_IGNORED)
    firstpass_image: str | None = Field(None, description=_IGNORED)
    comments: dict[str, Any] | None = Field(None, description=_IGNORED)
    infotext: str | None = Field(None, description=_IGNORED)
    script_args: list | None = Field(default_factory=list, description=_IGNORED)
    firstphase_width: int | None = Field(0, description=_IGNORED)
    firstphase_height: int | None = Field(0, description=_IGNORED)
    hr_scale: float | None = Field(2.0, description=_IGNORED + " (hires fix is off)")
    hr_upscaler: str | None = Field(None, description=_IGNORED + " (hires fix is off)")
    hr_second_pass_steps: int | None = Field(0, description=_IGNORED + " (hires fix is off)")
    hr_resize_x: int | None = Field(0, description=_IGNORED + " (hires fix is off)")
    hr_resize_y: int | None = Field(0, description=_IGNORED + " (hires fix is off)")
    hr_checkpoint_name: str | None = Field(None, description=_IGNORED + " (hires fix is off)")
    hr_sampler_name: str | None = Field(None, description=_IGNORED + " (hires fix is off)")
    hr_scheduler: str | None = Field(None, description=_IGNORED + " (hires fix is off)")
    hr_prompt: str | None = Field("", description=_IGNORED + " (hires fix is off)")
    hr_negative_prompt: str | None = Field("", description=_IGNORED + " (hires fix is off)")
    # Forge's additions to the hires fix.
    hr_additional_modules: list[str] | None = Field(default_factory=list, description=_IGNORED + " (hires fix is off)")
    hr_cfg: float | None = Field(1.0, description=_IGNORED + " (hires fix is off)")
    hr_distilled_cfg: float | None = Field(3.5, description=_IGNORED + " (hires fix is off)")

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int, info) -> int:
        if not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE:
            raise ValueError(f"must be between {MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE}; got {value}")
        if value % SIZE_MULTIPLE:
            lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE} here (A1111 allows 8); got {value} "
                             f"(try {lower or SIZE_MULTIPLE} or {lower + SIZE_MULTIPLE})")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "Txt2ImgRequest":
        if self.enable_hr:
            raise ValueError("enable_hr: hires fix is not supported; set enable_hr to false and ask for the final "
                             "width and height directly")
        if self.script_name:
            raise ValueError(f"script_name: scripts are not supported; remove script_name ({self.script_name!r})")
        if self.alwayson_scripts:
            raise ValueError(f"alwayson_scripts: extensions are not supported; remove "
                             f"{sorted(self.alwayson_scripts)}")
        if self.styles:
            raise ValueError(f"styles: saved styles are not stored here; put their text into the prompt and remove "
                             f"{self.styles}")
        return self

    @property
    def n(self) -> int:
        return self.batch_size * self.n_iter


class A1111Api:
    """The `/sdapi/v1` routes. Mixed into Ingress, so `self` has `config`, `generate` and `progress_of`."""

    @api.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(self, body: Txt2ImgRequest) -> dict:
        """A1111 txt2img: images as base64 PNG, `parameters` (the request with defaults), `info` (a JSON string)."""
        request = self._a1111_to_request(body)
        started = time.time()
        request.request_id = body.force_task_id
        outcome = await self.generate(request)
        images, seeds = [], []
        for result in outcome.results:
            images += [base64.b64encode(image).decode() for image in result.images]
            seeds += list(result.seeds)
        info = self._a1111_info(body, request, seeds, started)
        return {
            "images": images if body.send_images else [],
            "parameters": body.model_dump(),
            "info": json.dumps(info),
        }

    @api.get("/sdapi/v1/progress")
    async def a1111_progress(self, skip_current_image: bool = False) -> dict:
        """A1111 progress of the current job (the oldest running request of this ingress); idle when none."""
        return a1111_progress_body(await self.current_progress())

    @api.get("/internal/progress", include_in_schema=False)
    async def a1111_internal_progress(self, id_task: str | None = None) -> dict:
        """The progress route A1111's own page polls, answered for the job of one task id."""
        progress = await self.progress_of(id_task) if id_task else await self.current_progress()
        body = a1111_progress_body(progress)
        return {"active": progress is not None and not progress.get("finished", False),
                "queued": False, "completed": progress is not None and progress.get("finished", False),
                "progress": body["progress"], "eta": body["eta_relative"], "textinfo": body["textinfo"],
                "live_preview": None, "id_live_preview": -1}

    @api.get("/sdapi/v1/sd-models")
    async def a1111_sd_models(self) -> list[dict]:
        name = self.config.model_name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": self.config.model,
                 "config": None}]

    @api.get("/sdapi/v1/options")
    async def a1111_options(self) -> dict:
        """The settings A1111 clients read: the checkpoint, and that images come back as PNG."""
        return {"sd_model_checkpoint": self.config.model_name, "samples_format": "png",
                "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}

    @api.post("/sdapi/v1/options")
    async def a1111_set_options(self, options: dict[str, Any]) -> None:
        """Clients set the checkpoint before generating: the served model is the only one; other settings are
        ignored."""
        checkpoint = options.get("sd_model_checkpoint")
        if checkpoint is not None and checkpoint not in self.model_names:
            raise ApiError(422, f"sd_model_checkpoint {checkpoint!r} is not served here; use "
                                f"{self.config.model_name!r} (see /sdapi/v1/sd-models)", "sd_model_checkpoint")

    @api.get("/sdapi/v1/loras")
    async def a1111_loras(self) -> list[dict]:
        """A1111's LoRA list; a prompt uses one as `<lora:name:weight>`. Paths stay on the server."""
        return [{"name": name, "alias": name, "path": None, "metadata": {}}
                for name in (self.loras.names() if self.loras else [])]

    @api.get("/sdapi/v1/samplers")
    async def a1111_samplers(self) -> list[dict]:
        return [{"name": SAMPLER, "aliases": ["k_euler", "flow_match_euler"], "options": {}}]

    @api.get("/sdapi/v1/schedulers")
    async def a1111_schedulers(self) -> list[dict]:
        return [{"name": SCHEDULER.lower(), "label": SCHEDULER, "aliases": None, "default_rho": -1,
                 "need_inner_model": False}]

    # -- helpers ---------------------------------------------------------------------------------------------

    def _a1111_to_request(self, body: Txt2ImgRequest) -> ImageGenerationRequest:
        """The same request in the OpenAI shape; what only the service's config limits says in A1111's terms."""
        if body.n > self.config.max_n:
            raise ApiError(422, f"batch_size x n_iter must be at most {self.config.max_n}; got "
                                f"{body.batch_size} x {body.n_iter} = {body.n}", "batch_size")
        try:
            prompt, loras = parse_prompt_loras(body.prompt)
        except LoraError as exc:
            raise ApiError(422, str(exc), "prompt") from None
        if len(loras) > 1:
            raise ApiError(422, f"one LoRA per request here; the prompt names {len(loras)} "
                                f"({', '.join(name for name, _ in loras)}): keep one <lora:...> tag", "prompt")
        if not prompt.strip():
            raise ApiError(422, "prompt must not be empty", "prompt")
        lora = {"lora": loras[0][0], "lora_scale": loras[0][1]} if loras else {}
        if lora and not -2.0 <= lora["lora_scale"] <= 2.0:
            raise ApiError(422, f"LoRA weight must be between -2 and 2; got {lora['lora_scale']:g}", "prompt")
        return ImageGenerationRequest(
            **lora,
            prompt=prompt,
            negative_prompt=body.negative_prompt or None,
            n=body.n,
            size=f"{body.width}x{body.height}",
            seed=None if body.seed == -1 else body.seed,
            steps=body.steps,
            guidance_scale=max(0.0, body.cfg_scale - 1.0),
            output_format="png",
        )

    def _a1111_info(self, body: Txt2ImgRequest, request: ImageGenerationRequest, seeds: list[int],
                    started: float) -> dict:
        infotexts = [
            f"{body.prompt}\nNegative prompt: {body.negative_prompt}\nSteps: {body.steps}, Sampler: {SAMPLER}, "
            f"Schedule type: {SCHEDULER}, CFG scale: {body.cfg_scale:g}, Seed: {seed}, "
            f"Size: {body.width}x{body.height}, Model: {self.config.model_name}"
            for seed in seeds
        ]
        return {
            "prompt": body.prompt,
            "all_prompts": [body.prompt] * len(seeds),
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(seeds),
            "seed": seeds[0] if seeds else None,
            "all_seeds": seeds,
            "subseed": seeds[0] if seeds else None,
            "all_subseeds": seeds,
            "subseed_strength": 0.0,
            "width": body.width,
            "height": body.height,
            "sampler_name": SAMPLER,
            "scheduler": SCHEDULER,
            "cfg_scale": body.cfg_scale,
            "guidance_scale": request.guidance_scale,
            "steps": body.steps,
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "restore_faces": False,
            "sd_model_name": self.config.model_name,
            "sd_model_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": None,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": "zit-cluster",
        }


def a1111_progress_body(progress: dict | None) -> dict:
    """A1111's ProgressResponse from one progress record (deployments/progress.py), or the idle answer."""
    if progress is None or progress.get("finished"):
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                          "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
    return {
        "progress": round(progress["fraction"], 4),
        "eta_relative": round(progress["eta_s"], 2) if progress.get("eta_s") is not None else 0.0,
        "current_image": None,
        "textinfo": f"step {progress['step']}/{progress['steps']}",
        "state": {
            "skipped": False,
            "interrupted": False,
            "job": progress["request_id"],
            "job_count": progress.get("running", 1),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(progress["started_at"])),
            "job_no": 0,
            "sampling_step": progress["step"],
            "sampling_steps": progress["steps"],
        },
    }
