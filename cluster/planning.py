"""`zit plan` (which tier can hold a request, from the memory model) and `zit calibrate` (measure it on a GPU).

  zit plan --size 1024x1024 --n 4 [--steps 9] [--guidance G] [--fleet FILE] [--config FILE] [--json]
  zit calibrate --random-weights full --emulate-tiers          # on a CUDA machine, no download
  zit calibrate --model tiny --device cpu --dry-run            # the same code path on a CPU, nothing measured
  zit calibrate --model /models/zit --emulate-tiers            # the real weights, from a diffusers-format folder
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cluster.memory import (
    GIB,
    Calibration,
    architecture_of,
    fit_calibration,
    fits,
    largest_batch,
    largest_square,
    load_calibration,
    predict_peak,
    uses_cfg,
)
from cluster.profiles import ACCELERATOR_ONLY_PLACEMENTS, Profile, default_profile
from deployments.schemas import parse_size
from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes, vram_tiers

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

# Tiers whose typical cards lack bf16 (FACTS: the 4 GB GTX 1650 and the 6 GB GTX 1660 Super / RTX 2060 are compute
# capability 7.5). From 8 GB on, the common cards (RTX 3060/3070/3080/3090/40xx) have bf16; an 8 GB RTX 2070 Super
# does not, and a fleet file (--fleet) says so per card.
NO_BF16_TIERS = ("vram_4", "vram_6")

# Denoising steps of a calibration run: every step has the same peak, so two are enough to measure it (the first
# step can differ from the rest by lazily initialised kernels).
CALIBRATION_STEPS = 2


def default_tiers() -> dict[str, tuple[int, bool]]:
    """Every VRAM tier of the table in force at its nominal size; bf16 as its typical card (see NO_BF16_TIERS)."""
    return {name: (tier_vram_bytes(name), name not in NO_BF16_TIERS) for name in vram_tiers()}


def fleet_tiers(path: str | Path) -> dict[str, tuple[int, bool]]:
    """The tiers present in a fleet file, each planned for its weakest card (as the service runs them)."""
    from cluster.nvml import load_fleet  # lazily: the fleet module needs NVML bindings only here
    from cluster.tiers import tiers_for_cards

    return {t.name: (t.vram_bytes, t.bf16) for t in tiers_for_cards(load_fleet(path))}


def service_tiers(
    config_path: str | Path, fleet: str | Path | None = None
) -> tuple[dict[str, tuple[int, bool]], dict[str, Profile]]:
    """The tiers (budget, bf16) and the profiles the service runs with this config file, as `zit up --config FILE`
    builds them: one tier per VRAM class of the fleet file's cards (without one, every VRAM tier at its nominal size,
    bf16 as its typical card), each with the file's settings for that tier (`tiers_for_cards`), and each profile
    through `deployments.routing.tier_profile`, as the ingress plans with it: the tier's `profile` overrides and the
    adapters a LoRA folder (`lora_dir`) reserves. Raises ValueError (pydantic's, or a ProfileError / LoraError
    naming the knob) for a file the service would refuse, OSError for one that cannot be read.
    """
    from types import SimpleNamespace

    import yaml

    from cluster.cli import load_service_config
    from cluster.tiers import tiers_for_cards
    from deployments.routing import tier_budget, tier_profile

    try:
        config = load_service_config(Path(config_path), {})
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path} is not valid YAML: {exc}") from None
    configured = config.tiers if "tiers" in config.model_fields_set else None
    if fleet is not None:
        from cluster.nvml import load_fleet

        cards = load_fleet(fleet)
    else:
        cards = [SimpleNamespace(tier=name, bf16=bf16, memory_total=budget, slots=1, speed=None)
                 for name, (budget, bf16) in default_tiers().items()]
    lora = config.lora_settings()
    reserved = lora.reserved_params if lora else 0
    tiers = tiers_for_cards(cards, configured)
    return ({t.name: (tier_budget(t), t.bf16) for t in tiers},
            {t.name: tier_profile(t, reserved) for t in tiers})


def split_n(n: int, batch: int) -> list[int]:
    """n images in as few chunks of at most `batch` as possible, sizes as even as possible ([2, 2, 1] for 5 by 2)."""
    chunks = math.ceil(n / batch)
    base, extra = divmod(n, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


@dataclass(frozen=True)
class TierPlan:
    """How one tier would run a request: chunk sizes (empty when it cannot), or why not."""

    tier: str
    profile: Profile
    budget: int
    chunks: list[int]
    reason: str | None

    @property
    def fits(self) -> bool:
        return self.reason is None


def plan_tier(
    tier: str, profile: Profile, budget: int, width: int, height: int, n: int, steps: int,
    calibration: Calibration | None = None, cfg: bool = False,
) -> TierPlan:
    """Whether `tier` (its profile, its smallest card's `budget` bytes) takes n images of width x height, guided
    (classifier-free guidance doubles the transformer's batch) when `cfg`.

    Algorithm: the steps must be within the profile's limit; the largest batch that fits the budget at this size is
    the chunk size (auto batch size), and n is split into even chunks of at most that. When not even one image fits,
    `reason` is the memory model's, with the numbers. The ingress routes and `zit plan` reports with this function.
    """
    if steps > profile.max_steps:
        return TierPlan(tier, profile, budget, [],
                        f"steps={steps} is above profile {profile.name}'s max_steps {profile.max_steps}")
    batch = largest_batch(width, height, profile, budget, calibration, cfg)
    if batch == 0:
        return TierPlan(tier, profile, budget, [], fits(width, height, 1, profile, budget, calibration, cfg))
    return TierPlan(tier, profile, budget, split_n(n, batch), None)


def largest_request(profile: Profile, budget: int, width: int, height: int,
                    calibration: Calibration | None = None, cfg: bool = False) -> dict[str, int]:
    """The largest square side a tier takes at n=1, and the most images of width x height it takes per call (both
    guided when `cfg`)."""
    return {
        "side_at_n1": largest_square(profile, budget, 1, calibration, cfg),
        "n_at_size": largest_batch(width, height, profile, budget, calibration, cfg),
    }


def plan(
    width: int,
    height: int,
    n: int,
    steps: int = 9,
    tiers: dict[str, tuple[int, bool]] | None = None,
    calibration: Calibration | None = None,
    cfg: bool = False,
    profiles: dict[str, Profile] | None = None,
) -> list[dict]:
    """For each tier: whether n images of width x height fit, the predicted peak, the profile, the chunks.

    Each tier runs `profiles[tier]` when given (the service's profile, operator overrides applied: `service_tiers`),
    else its default profile for its bf16 support (see `plan_tier`); `cfg`: the request uses classifier-free
    guidance. The predicted peak is that of the largest chunk. `largest` gives the largest square side the tier
    accepts at n=1 and the most images of this size.
    """
    cal = calibration or load_calibration()
    rows = []
    for name, (budget, bf16) in (tiers or default_tiers()).items():
        profile = (profiles or {}).get(name) or default_profile(name, bf16)
        tier_plan = plan_tier(name, profile, budget, width, height, n, steps, cal, cfg)
        estimate = predict_peak(width, height, max(tier_plan.chunks, default=1), profile, cal, cfg)
        rows.append({
            "tier": name,
            "vram_gb": round(budget / GIB, 2),
            "bf16": bf16,
            "profile": profile.name,
            "technique": profile.technique(),
            "cfg": cfg,
            "largest": largest_request(profile, budget, width, height, cal, cfg),
            "fits": tier_plan.fits,
            "peak_gb": round(estimate.total / GIB, 2),
            "phase": estimate.phase,
            "terms": estimate.terms(),
            "chunks": tier_plan.chunks,
            "reason": tier_plan.reason,
        })
    return rows


def _format_table(rows: list[dict], width: int, height: int, n: int, cal: Calibration, guidance: float = 0.0) -> str:
    guided = f", guidance {guidance:g} (classifier-free: transformer batch doubled)" if guidance > 0 else ""
    lines = [f"{n} x {width}x{height}{guided}  (calibration: {cal.source}, {cal.card or 'no card'}, {cal.date})", ""]
    header = f"{'tier':<9} {'VRAM':>6} {'fits':<4} {'peak GB':>7}  {'chunks':<12} {'largest (side@n=1, n@size)':<27} technique"
    lines += [header, "-" * len(header)]
    for r in rows:
        largest = f"{r['largest']['side_at_n1']}px, n={r['largest']['n_at_size']}"
        chunks = "+".join(map(str, r["chunks"])) or "-"
        lines.append(
            f"{r['tier']:<9} {r['vram_gb']:>6.1f} {'yes' if r['fits'] else 'no':<4} {r['peak_gb']:>7.2f}  "
            f"{chunks:<12} {largest:<27} {r['technique']}"
        )
    for r in rows:
        if not r["fits"]:
            lines.append(f"  {r['tier']}: {r['reason']}")
    return "\n".join(lines)


def check_guidance(guidance: float) -> float:
    """`guidance` if a request may carry it as guidance_scale (the API's own bounds), else ValueError saying so."""
    from pydantic import ValidationError

    from deployments.schemas import ImageGenerationRequest

    try:
        ImageGenerationRequest(prompt="plan", guidance_scale=guidance)
    except ValidationError as exc:
        raise ValueError(f"--guidance {guidance:g}: {exc.errors()[0]['msg']} (a request's guidance_scale)") from None
    return guidance


def cmd_plan(args: argparse.Namespace) -> int:
    profiles = None
    try:
        width, height = parse_size(args.size)
        guidance = check_guidance(args.guidance)
        cal = load_calibration(args.calibration)
        if args.config:
            tiers, profiles = service_tiers(args.config, args.fleet)
        else:
            tiers = fleet_tiers(args.fleet) if args.fleet else None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if args.n < 1:
        print(f"error: --n must be at least 1; got {args.n}", flush=True)
        return 2
    if tiers == {}:
        where = f"{args.fleet}" if args.fleet else f"{args.config}'s tiers"
        print(f"error: no card in {where} reaches the smallest tier ({min(vram_tiers().values()):g} GB)")
        return 2
    rows = plan(width, height, args.n, args.steps, tiers, cal, uses_cfg(guidance), profiles)
    print(json.dumps(rows, indent=2) if args.json else _format_table(rows, width, height, args.n, cal, guidance),
          flush=True)
    return 0 if any(r["fits"] for r in rows) else 1


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="which tiers can hold a request, by the memory model")
    p.add_argument("--size", default="1024x1024", help="WxH (default %(default)s)")
    p.add_argument("--n", type=int, default=1, help="images in the request (default %(default)s)")
    p.add_argument("--steps", type=int, default=9, help="denoising steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="the request's guidance_scale (default %(default)s, Turbo's); above 0 classifier-free "
                        "guidance doubles the transformer's batch")
    p.add_argument("--fleet", type=Path, help="plan for the tiers of this fleet file instead of every tier")
    p.add_argument("--config", type=Path,
                   help="the service's config (serve_config.yaml or a YAML of service settings, as `zit up --config` "
                        "reads): plan with its tier profile overrides and LoRA reserve, as the service does")
    p.add_argument("--calibration", type=Path, help="calibration JSON (default: $ZIT_CALIBRATION_FILE or shipped)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per tier")
    p.set_defaults(func=cmd_plan)


# -- zit calibrate -------------------------------------------------------------------------------------------------


def full_size_pipeline_factory(device: str, seed: int = 0) -> Callable[[], "ZImagePipeline"]:
    """A factory of full-size Z-Image-Turbo pipelines with random bf16 weights (no download).

    The weights are drawn once, on `device` (fast on a GPU), and kept on the CPU; each call of the factory builds the
    modules with empty parameters (accelerate's init_empty_weights, buffers real) and assigns those CPU tensors, so
    a fresh pipeline for the next profile costs no copy, and a profile's casting or offloading replaces tensors
    without touching the shared ones. The tokenizer and scheduler are the tiny model's (same classes; its byte
    vocabulary is a subset of Qwen3's ids). On `device='meta'` nothing is drawn or held: the pipelines have the full
    architecture and no memory (a CPU test counts their parameters).
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from deployments.pipeline import resolve_model

    te_config = Qwen3Config(
        hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=9728, vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )

    def vae_module():
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            sample_size=1024,
        )

    builders = {
        "transformer": ZImageTransformer2DModel,  # its defaults are the real config
        "text_encoder": lambda: Qwen3Model(te_config),
        "vae": vae_module,
    }
    # 1. Draw every weight once on `device` in bf16, keep it on the CPU.
    torch.manual_seed(seed)
    masters: dict[str, dict[str, torch.Tensor]] = {}
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        for name, build in builders.items():
            with torch.device(device):
                module = build()
            masters[name] = {k: v if device == "meta" else v.to("cpu") for k, v in module.state_dict().items()}
            del module
    finally:
        torch.set_default_dtype(default_dtype)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tiny = ZImagePipeline.from_pretrained(resolve_model("tiny"))

    # 2. Each pipeline: empty modules, then the shared CPU tensors assigned into them.
    def make() -> "ZImagePipeline":
        parts = {}
        for name, build in builders.items():
            with init_empty_weights(include_buffers=False):
                module = build()
            module.load_state_dict(masters[name], assign=True)
            parts[name] = module.to(torch.bfloat16).eval()
        pipe = ZImagePipeline(scheduler=tiny.scheduler, tokenizer=tiny.tokenizer, **parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def tiny_pipeline_factory() -> Callable[[], "ZImagePipeline"]:
    """A factory of the tiny model's pipelines, loaded on the CPU in float32."""
    from deployments.pipeline import load_pipeline, resolve_model

    folder = resolve_model("tiny")
    return lambda: load_pipeline(folder, "cpu")


def model_pipeline_factory(spec: str, device: str) -> Callable[[], "ZImagePipeline"]:
    """A factory of pipelines of the model `spec` names ('tiny', a diffusers-format folder, or the downloaded
    Tongyi-MAI/Z-Image-Turbo), each loaded fresh with `ZImagePipeline.from_pretrained` on the CPU, as a replica loads
    it (deployments/pipeline.py), for `apply_profile` to place: in bf16 (the stored dtype) when calibrating on CUDA,
    in float32 on a CPU. Raises ModelNotFound, with how to get the model, before anything is measured."""
    import torch

    from deployments.pipeline import load_pipeline, resolve_model

    if spec == "tiny":
        return tiny_pipeline_factory()
    folder = resolve_model(spec)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return lambda: load_pipeline(folder, "cpu", dtype)


def model_architecture(spec: str, sizes: dict[str, int]) -> str:
    """Calibration.architecture for a loaded model: 'tiny', 'z-image-turbo' when its transformer has the full model's
    parameter count (the shipped calibration's), else the folder's name."""
    from cluster.memory import DEFAULT_CALIBRATION

    if spec == "tiny":
        return "tiny"
    if sizes["transformer_params"] == load_calibration(DEFAULT_CALIBRATION).transformer_params:
        return "z-image-turbo"
    return Path(spec).name or spec


def calibration_profiles(tiers: list[str], bf16_modes: list[bool], device: str) -> list[tuple[str, Profile]]:
    """(tier, profile) for each tier and bf16 mode; on a CPU, the placements that need an accelerator are left out."""
    out = []
    for tier in tiers:
        for bf16 in bf16_modes:
            profile = default_profile(tier, bf16)
            if device == "cpu" and profile.weights in ACCELERATOR_ONLY_PLACEMENTS:
                continue
            out.append((tier, profile))
    return out


def measure_run(pipe, profile: Profile, width: int, height: int, n: int, steps: int, device: str) -> dict:
    """Run one pipeline call and return its memory and time measurements.

    On CUDA, peak statistics are reset at each phase boundary: when the transformer is first called (end of the
    prompt encoding) and after the last step's callback (start of decoding), so encode, denoise and decode peaks are
    separate. NVML's used memory minus PyTorch's reserved memory gives the CUDA context. On a CPU only time is
    measured (memory fields are None). A CUDA out-of-memory is caught and returned as {"oom": True, "error": ...}.
    """
    import torch

    cuda = device.startswith("cuda")
    peaks: dict[str, int | None] = {"encode": None, "denoise": None, "decode": None}
    reserved: list[int] = []

    def boundary(phase: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            peaks[phase] = torch.cuda.max_memory_allocated()
            reserved.append(torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

    def first_call(module, args):
        if peaks["encode"] is None:
            boundary("encode")

    def step_end(pipeline, step, timestep, kwargs):
        if step == steps - 1:
            boundary("denoise")
        return kwargs

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rest = torch.cuda.memory_allocated() if cuda else None
    handle = pipe.transformer.register_forward_pre_hook(first_call)
    record: dict[str, Any] = {"profile": profile.model_dump(), "width": width, "height": height, "n": n, "steps": steps}
    started = time.perf_counter()
    try:
        out = pipe(
            prompt="a red fox in the snow", width=width, height=height, num_inference_steps=steps,
            guidance_scale=0.0, num_images_per_prompt=n, output_type="pt",
            generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=step_end,
        )
        boundary("decode")
    except torch.OutOfMemoryError as exc:
        record.update(oom=True, error=str(exc).splitlines()[0])
        return record
    finally:
        handle.remove()
    seconds = time.perf_counter() - started
    images = out.images
    record.update(
        oom=False,
        seconds=round(seconds, 3),
        seconds_per_image=round(seconds / n, 3),
        finite=bool(torch.isfinite(images).all()),
        rest_bytes=rest,
        encode_peak_bytes=peaks["encode"],
        denoise_peak_bytes=peaks["denoise"],
        decode_peak_bytes=peaks["decode"],
        reserved_peak_bytes=max(reserved) if reserved else None,
    )
    if cuda:
        record["nvml_used_bytes"] = _nvml_used(torch.cuda.current_device())
        if record["nvml_used_bytes"] is not None:
            record["context_bytes"] = max(0, record["nvml_used_bytes"] - torch.cuda.memory_reserved())
    return record


def _nvml_used(index: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # no NVML on this machine: the context is then not measured, the default stays
        return None


def emulate_vram(budget_bytes: int | None, context_bytes: float, device: str) -> None:
    """Cap PyTorch's pool so that pool + context fits `budget_bytes` (None: the whole card)."""
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if budget_bytes is None else max(0.01, min(1.0, (budget_bytes - context_bytes) / total))
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def provenance(device: str) -> dict:
    """card, driver, torch, diffusers and date for the calibration file."""
    import diffusers
    import torch

    card = driver = None
    if device.startswith("cuda"):
        card = torch.cuda.get_device_name(torch.device(device).index or 0)
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            driver = None
    return {
        "card": card, "driver": driver, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "date": dt.date.today().isoformat(),
    }


# A calibration under a deadline starts a profile (or a run) only when the slowest one measured so far, times this,
# plus the margin, still fits before it: a later profile can be slower than the ones before it (larger sizes, float32
# compute, offload over PCIe), and what comes after the last run (fit, summary, writing) needs a few seconds too.
DEADLINE_SAFETY = 1.25
DEADLINE_MARGIN_S = 20.0


class TimeBudget:
    """When to stop starting work so that the last of it ends before `deadline_s` (seconds from creation; None: no
    deadline).

    Algorithm: a new profile costs its set-up (building and placing the pipeline) and all its runs, so it starts only
    when the time left is at least the slowest profile measured so far (the one running now included) x
    DEADLINE_SAFETY + DEADLINE_MARGIN_S; a further run of the running profile starts when the time left is at least
    the slowest run so far x DEADLINE_SAFETY + DEADLINE_MARGIN_S. Before anything is measured, only the margin is
    needed. `clock` is injectable for tests.
    """

    def __init__(self, deadline_s: float | None, clock: Callable[[], float] = time.monotonic):
        self.deadline_s = deadline_s
        self.clock = clock
        self.started = clock()
        self.slowest_profile_s = 0.0
        self.slowest_run_s = 0.0
        self._profile_started: float | None = None

    def left_s(self) -> float:
        return math.inf if self.deadline_s is None else self.deadline_s - (self.clock() - self.started)

    def refuse(self, new_profile: bool) -> str | None:
        """None when the next profile (`new_profile`) or run may start, else why not, with the numbers."""
        if self.deadline_s is None:
            return None
        if new_profile:
            running = self.clock() - self._profile_started if self._profile_started is not None else 0.0
            what, slowest = "profile", max(self.slowest_profile_s, running)
        else:
            what, slowest = "run", self.slowest_run_s
        need = slowest * DEADLINE_SAFETY + DEADLINE_MARGIN_S
        left = self.left_s()
        if left < need:
            return (f"time budget: {max(0.0, left):.0f} s of {self.deadline_s:.0f} s left, the slowest {what} so far "
                    f"took {slowest:.0f} s (x{DEADLINE_SAFETY} + {DEADLINE_MARGIN_S:.0f} s margin)")
        return None

    def profile_starts(self) -> None:
        now = self.clock()
        if self._profile_started is not None:
            self.slowest_profile_s = max(self.slowest_profile_s, now - self._profile_started)
        self._profile_started = now

    def run_took(self, seconds: float) -> None:
        self.slowest_run_s = max(self.slowest_run_s, seconds)


def run_calibration(
    factory: Callable[[], "ZImagePipeline"],
    grid: list[tuple[str, Profile, int, int, int]],
    device: str,
    steps: int,
    log_path: Path,
    emulate: Callable[[str], int | None] = lambda tier: None,
    deadline_s: float | None = None,
    calibration: Calibration | None = None,
    say: Callable[[str], None] = print,
) -> list[dict]:
    """Measure every (tier, profile, width, height, n) of `grid`, appending one JSON line per run to `log_path`.

    Runs of one profile share a pipeline (built by `factory`, the profile applied once). `emulate(tier)` gives the
    memory to emulate for that tier (None: the whole card); a run the memory model says does not fit that memory is
    recorded as skipped, not run. With `deadline_s`, a profile or run starts only when the slowest one so far is
    expected to end before it (`TimeBudget`); the others are recorded as skipped. A progress bar shows the runs.
    """
    import torch
    from tqdm import tqdm

    from cluster.profiles import apply_profile

    cal = calibration or load_calibration()
    cuda = device.startswith("cuda")
    budget_clock = TimeBudget(deadline_s)
    records: list[dict] = []
    context = cal.context_bytes
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pipe, current = None, None
    with log_path.open("a") as log, tqdm(total=len(grid), desc="calibrate", unit="run", file=sys.stdout) as bar:
        for tier, profile, width, height, n in grid:
            budget = emulate(tier)
            record: dict[str, Any] = {"tier": tier, "profile": profile.model_dump(), "width": width, "height": height,
                                      "n": n, "budget_bytes": budget}
            estimate = predict_peak(width, height, n, profile, cal)
            record["predicted_bytes"] = estimate.total
            why = fits(width, height, n, profile, budget, cal) if budget else None
            if why is None:
                why = budget_clock.refuse(new_profile=current != profile.name)
            if why:
                record["skipped"] = why
            else:
                if current != profile.name:
                    budget_clock.profile_starts()
                    pipe = None
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                        emulate_vram(budget, context, device)
                    pipe = factory()
                    apply_profile(pipe, profile, device)
                    current = profile.name
                run_started = time.monotonic()
                record.update(measure_run(pipe, profile, width, height, n, steps, device))
                budget_clock.run_took(time.monotonic() - run_started)
                record["tier"] = tier
                if record.get("context_bytes"):
                    context = record["context_bytes"]
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            say(_describe(record))
    return records


def _describe(r: dict) -> str:
    head = f"{r['profile']['name']:<13} {r['width']}x{r['height']} n={r['n']}:"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    if r.get("oom"):
        return f"{head} OUT OF MEMORY ({r['error']})"
    peak = r.get("reserved_peak_bytes")
    measured = f"reserved peak {peak / GIB:.2f} GiB" if peak is not None else "memory not measured on CPU"
    return f"{head} {measured}, predicted {r['predicted_bytes'] / GIB:.2f} GiB, {r['seconds_per_image']:.2f} s/image"


def largest_request_grid(
    tiers: list[str], bf16_modes: list[bool], device: str, cal: Calibration
) -> list[tuple[str, Profile, int, int, int]]:
    """Per tier profile: 512x512 n=1, its largest square at n=1, and 1024x1024 (or its largest side) at its largest n.

    These are the cells that decide routing: the smallest request, the largest image and the largest batch. Sides
    and batches come from the memory model at the tier's nominal memory.
    """
    grid = []
    for tier, profile in calibration_profiles(tiers, bf16_modes, device):
        budget = tier_vram_bytes(tier) if tier in VRAM_TIERS_GIB else None
        cells = [(512, 1)]
        if budget:
            side = largest_square(profile, budget, 1, cal)
            mid = min(1024, side)
            cells += [(side, 1), (mid, largest_batch(mid, mid, profile, budget, cal))]
        for side, n in dict.fromkeys(cells):
            if side >= 64 and n >= 1:
                grid.append((tier, profile, side, side, n))
    return grid


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: zit calibrate measures GPU memory and needs CUDA, which this machine does not have. "
            "Run it on a machine with an NVIDIA GPU, or try the code path here with "
            "`zit calibrate --model tiny --device cpu --dry-run` (nothing is measured).",
            flush=True,
        )
        return 2
    if device == "cpu" and not args.dry_run:
        print("error: on a CPU nothing can be measured; add --dry-run to exercise the code path", flush=True)
        return 2
    base = load_calibration(args.calibration)
    tiers = args.tiers.split(",") if args.tiers else list(VRAM_TIERS_GIB)
    unknown = [t for t in tiers if t not in VRAM_TIERS_GIB and t != "cpu"]
    if unknown:
        print(f"error: unknown tier(s) {unknown}; known: {list(VRAM_TIERS_GIB)}", flush=True)
        return 2
    bf16_modes = {"yes": [True], "no": [False], "both": [True, False]}[args.bf16]
    if args.random_weights == "full" and args.model is not None:
        print(f"error: --random-weights full builds its own full-size weights; --model {args.model} would be ignored. "
              "Give one of them.", flush=True)
        return 2
    model = args.model or "tiny"
    if args.random_weights == "full":
        factory = full_size_pipeline_factory(device)
    else:
        from deployments.pipeline import ModelNotFound

        try:  # the named model, loaded as a replica loads it: never the tiny one under another name
            factory = model_pipeline_factory(model, device)
        except ModelNotFound as exc:
            print(f"error: {exc}", flush=True)
            return 2
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
        ns = [int(s) for s in args.n.split(",")]
        grid = [(t, p, s, s, n) for t, p in calibration_profiles(tiers, bf16_modes, device) for s in sizes for n in ns]
    else:
        grid = largest_request_grid(tiers, bf16_modes, device, base)

    def emulate(tier: str) -> int | None:
        if args.emulate_vram:
            return int(args.emulate_vram * GIB)
        if args.emulate_tiers and tier in VRAM_TIERS_GIB:
            return tier_vram_bytes(tier)
        return None

    out = args.out or Path(f"calibration-{dt.date.today().isoformat()}.json")
    log_path = args.log or out.with_suffix(".jsonl")
    what = "full-size random weights" if args.random_weights else model
    print(f"Calibrating {len(grid)} run(s) on {device} ({what}); log: {log_path}", flush=True)
    records = run_calibration(factory, grid, device, args.steps, log_path, emulate, args.deadline_s, base)
    return write_calibration(records, base, factory, device, out, args.random_weights == "full", args.dry_run, model)


def write_calibration(records: list[dict], base: Calibration, factory, device: str, out: Path, full: bool,
                      dry_run: bool, model: str = "tiny") -> int:
    """Fit and write the calibration file; 1 when a run that was predicted to fit ran out of memory, else 0.

    `full`: the runs used full-size random weights (the architecture is the base's); else `model` names what was
    loaded, and its parameter counts are read from a pipeline the factory builds (`architecture_of`)."""
    ran = [r for r in records if "skipped" not in r]
    what = "full-size random weights" if full else f"model {model}"
    if dry_run or not device.startswith("cuda"):
        cal = base.model_copy(update={
            "notes": f"dry run on {device} with {what}: nothing measured; coefficients are the estimate. {base.notes}",
            "source": "estimate", **provenance(device),
        })
    else:
        sizes = {} if full else architecture_of(factory())
        arch = base.architecture if full else model_architecture(model, sizes)
        try:
            cal = fit_calibration(ran, base.model_copy(update={**sizes, "architecture": arch}), **provenance(device),
                                  notes=f"measured by zit calibrate with {what}: {len(ran)} runs, "
                                        f"{CALIBRATION_STEPS}-step calls; prompt-encoder activation and margin floor "
                                        "are still the estimate")
        except ValueError as exc:
            print(f"error: {exc}", flush=True)
            return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cal.model_dump_json(indent=2) + "\n")
    ooms = [r for r in ran if r.get("oom")]
    bad = [r for r in ran if r.get("finite") is False]
    print(f"Wrote {out} ({cal.source}); {len(ran)} run(s), {len(ooms)} out of memory, {len(bad)} with NaN/inf.",
          flush=True)
    return 1 if ooms else 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure peak memory and speed per profile and write a calibration file")
    p.add_argument("--model", help="'tiny' (default), a diffusers-format Z-Image-Turbo folder, or "
                        "Tongyi-MAI/Z-Image-Turbo after `zit download`; loaded with from_pretrained as a replica "
                        "loads it (not with --random-weights full)")
    p.add_argument("--random-weights", choices=["full"], help="full-size Z-Image-Turbo with random weights")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --dry-run")
    p.add_argument("--tiers", help="comma-separated tiers (default: every VRAM tier)")
    p.add_argument("--bf16", choices=["yes", "no", "both"], default="both",
                   help="profiles for cards with bf16, without, or both (default %(default)s)")
    p.add_argument("--sizes", help="comma-separated square sides (default: each tier's largest accepted requests)")
    p.add_argument("--n", default="1", help="comma-separated batch sizes with --sizes (default %(default)s)")
    p.add_argument("--steps", type=int, default=CALIBRATION_STEPS, help="denoising steps per run")
    p.add_argument("--emulate-vram", type=float, metavar="GB", help="cap every run to this much memory")
    p.add_argument("--emulate-tiers", action="store_true", help="cap each tier's runs to the tier's nominal VRAM")
    p.add_argument("--deadline-s", type=float,
                   help="every run should have ended this many seconds after the runs begin: a profile or run starts "
                        f"only when the slowest so far (x{DEADLINE_SAFETY:g}, + {DEADLINE_MARGIN_S:.0f} s) would end "
                        "in time; the rest are skipped")
    p.add_argument("--calibration", type=Path, help="calibration to start from (default: the shipped estimate)")
    p.add_argument("--out", type=Path, help="calibration JSON to write (default calibration-DATE.json)")
    p.add_argument("--log", type=Path, help="raw JSONL log (default: next to --out)")
    p.add_argument("--dry-run", action="store_true", help="run the code path without measuring (CPU)")
    p.set_defaults(func=cmd_calibrate)
