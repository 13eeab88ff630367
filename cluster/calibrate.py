"""Measuring the memory model on a GPU (`zit calibrate`, bench/gpu_calibrate.py): pipelines to measure (full-size
random weights, the tiny model, or a real folder), one measured run per grid cell, a time budget, and the calibration
file fitted from the runs (cluster.memory.fit_calibration). The command line is cli/calibrate.py.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import sys
import time
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
)
from cluster.profiles import ACCELERATOR_ONLY_PLACEMENTS, Profile, default_profile
from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes

if TYPE_CHECKING:
    from diffusers import ZImagePipeline


# Denoising steps of a calibration run: every step has the same peak, so two are enough to measure it (the first
# step can differ from the rest by lazily initialised kernels).
CALIBRATION_STEPS = 2


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

    from cluster.pipeline import resolve_model

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
    from cluster.pipeline import load_pipeline, resolve_model

    folder = resolve_model("tiny")
    return lambda: load_pipeline(folder, "cpu")


def model_pipeline_factory(spec: str, device: str) -> Callable[[], "ZImagePipeline"]:
    """A factory of pipelines of the model `spec` names ('tiny', a diffusers-format folder, or the downloaded
    Tongyi-MAI/Z-Image-Turbo), each loaded fresh with `ZImagePipeline.from_pretrained` on the CPU, as a replica loads
    it (deployments/pipeline.py), for `apply_profile` to place: in bf16 (the stored dtype) when calibrating on CUDA,
    in float32 on a CPU. Raises ModelNotFound, with how to get the model, before anything is measured."""
    import torch

    from cluster.pipeline import load_pipeline, resolve_model

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
            # The prompt tokens the transformer runs (the pipeline passes the real ones): the fit uses them.
            if len(args) >= 3 and isinstance(args[2], (list, tuple)) and args[2]:
                record["prompt_tokens"] = max(len(c) for c in args[2])

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


# -- the fake-tensor trace (`zit calibrate --trace`, cluster/trace.py) ---------------------------------------------

# docs/memory.md's grid (bench/memory_table.py uses these), the batch sizes a tier runs, both compute dtypes; the VAE
# untiled and at each tile a tier uses; the transformer also at the fewest prompt tokens it runs (32, a short prompt
# the text-encoder stage has encoded: cluster.memory.for_prompt), where the fixed term weighs most.
TRACE_SIDES = (512, 768, 1024, 1536, 2048)
TRACE_NS = (1, 2, 4)
TRACE_DTYPES = ("bfloat16", "float32")
TRACE_VAE = ((False, 0), (True, 512), (True, 768), (True, 1024))
TRACE_SHORT_PROMPT = 32


def trace_jobs() -> list[tuple[str, dict]]:
    """Every cell of the trace's grid: (phase, keyword arguments of its cluster.trace function)."""
    jobs: list[tuple[str, dict]] = [("encode", {"compute_dtype": d}) for d in TRACE_DTYPES]
    for dtype in TRACE_DTYPES:
        for side in TRACE_SIDES:
            for n in TRACE_NS:
                for cfg in (False, True):
                    jobs.append(("denoise", {"width": side, "height": side, "n": n, "cfg": cfg,
                                             "compute_dtype": dtype}))
        for side in TRACE_SIDES:  # the shortest prompt the transformer runs (a stage-encoded request's real count)
            jobs.append(("denoise", {"width": side, "height": side, "n": 1, "cfg": False, "compute_dtype": dtype,
                                     "prompt_tokens": TRACE_SHORT_PROMPT}))
        # Layerwise casting as the tiers run it: fp8 leaves on bf16 cards, bf16 leaves on float32 cards (whose text
        # encoder is cast too); the hooks' upcast weight copies are the model's `upcast` weights term.
        storage = "float8_e4m3fn" if dtype == "bfloat16" else "bfloat16"
        jobs.append(("denoise", {"width": 1024, "height": 1024, "n": 1, "cfg": False, "compute_dtype": dtype,
                                 "storage_dtype": storage}))
        if dtype == "float32":
            jobs.append(("encode", {"compute_dtype": dtype, "storage_dtype": "bfloat16"}))
        for side in TRACE_SIDES:
            for n in (1, 4):
                for tiling, tile in TRACE_VAE:
                    if tiling and tile >= side:
                        continue  # one tile covers the image: the same as untiled
                    for slicing in (False, True) if n > 1 else (True,):
                        jobs.append(("decode", {"width": side, "height": side, "n": n, "compute_dtype": dtype,
                                                "tiling": tiling, "tile_px": tile or 1024, "slicing": slicing}))
    return jobs


def grid_cell(phase: str, kwargs: dict):
    """The cell (cluster.memory.TracedCell) that tracing `phase` with `kwargs` (its cluster.trace function's
    arguments, `trace_jobs`) records, before its figures."""
    from cluster.encoding import MAX_SEQUENCE_LENGTH
    from cluster.memory import TracedCell

    tiling = kwargs.get("tiling", False)
    return TracedCell(phase=phase, compute_dtype=kwargs["compute_dtype"], width=kwargs.get("width", 0),
                      height=kwargs.get("height", 0), n=kwargs.get("n", 1), cfg=kwargs.get("cfg", False),
                      prompt_tokens=kwargs.get("prompt_tokens", kwargs.get("tokens", MAX_SEQUENCE_LENGTH)),
                      vae_tiling=tiling, vae_tile_px=kwargs["tile_px"] if tiling else 0,
                      vae_slicing=kwargs.get("slicing", False), storage_dtype=kwargs.get("storage_dtype"),
                      peak_bytes=0)


def trace_cell(phase: str, kwargs: dict):
    """Trace one cell (cluster/trace.py) and return it as the calibration records it (cluster.memory.TracedCell),
    with the tracer's notes."""
    from cluster import trace

    run = {"encode": trace.trace_text_encoder, "denoise": trace.trace_transformer_step,
           "decode": trace.trace_vae_decode}[phase]
    t = run(**kwargs)
    cell = grid_cell(phase, kwargs).model_copy(update={
        "peak_bytes": t.peak_bytes, "weight_copies_bytes": t.weight_copies_bytes, "rounding_bytes": t.rounding_bytes,
        "seconds": round(t.seconds, 2)})
    return cell, t.notes


def describe_cell(cell) -> str:
    stored = f", stored {cell.storage_dtype}" if cell.storage_dtype else ""
    if cell.phase == "encode":
        return f"encode {cell.prompt_tokens} tokens, {cell.compute_dtype}{stored}"
    what = f"{cell.phase} {cell.width}x{cell.height} n={cell.n}, {cell.compute_dtype}"
    if cell.phase == "denoise":
        return what + (", guided" if cell.cfg else "") + f", {cell.prompt_tokens} prompt tokens{stored}"
    tiles = f"tiles {cell.vae_tile_px}" if cell.vae_tiling else "untiled"
    return what + f", {tiles}" + (", sliced" if cell.vae_slicing else "")


def trace_grid(say=print, jobs: list | None = None):
    """Run the trace over the grid (`trace_jobs`) on this CPU, saying each cell as it ends; the figures as the
    calibration records them (cluster.memory.TracedFigures, bounds not yet computed)."""
    import diffusers
    import torch

    from cluster.memory import TracedFigures

    jobs = trace_jobs() if jobs is None else jobs
    cells, notes = [], []
    started = time.perf_counter()
    for i, (phase, kwargs) in enumerate(jobs, 1):
        cell, cell_notes = trace_cell(phase, kwargs)
        cells.append(cell)
        notes += [note for note in cell_notes if note not in notes]
        copies = f", {cell.weight_copies_bytes / 2**20:.0f} MiB upcast weights" if cell.weight_copies_bytes else ""
        say(f"[{i}/{len(jobs)}] {describe_cell(cell)}: {cell.peak_bytes / GIB:.3f} GiB live "
            f"(+{cell.rounding_bytes / 2**20:.0f} MiB rounding{copies}), {cell.seconds:.1f} s")
    return TracedFigures(date=dt.date.today().isoformat(), torch=torch.__version__, diffusers=diffusers.__version__,
                         seconds=round(time.perf_counter() - started, 1), notes=notes, cells=cells)
