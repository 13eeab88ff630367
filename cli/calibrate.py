"""`zit calibrate`: measure peak memory and speed per profile on a GPU and write a calibration file (the measuring is
cluster/calibrate.py).

  zit calibrate --random-weights full --emulate-tiers          # on a CUDA machine, no download
  zit calibrate --model tiny --device cpu --dry-run            # the same code path on a CPU, nothing measured
  zit calibrate --model /models/zit --emulate-tiers            # the real weights, from a diffusers-format folder
  zit calibrate --trace --out cluster/calibration/default.json  # no GPU: the traced lower bound, on this CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from cluster.calibrate import (
    CALIBRATION_STEPS,
    DEADLINE_MARGIN_S,
    DEADLINE_SAFETY,
    calibration_profiles,
    full_size_pipeline_factory,
    largest_request_grid,
    model_pipeline_factory,
    run_calibration,
    write_calibration,
)
from cluster.memory import GIB, load_calibration
from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes


def cmd_trace(args: argparse.Namespace) -> int:
    """`zit calibrate --trace`: the fake-tensor trace of the full-size model on this CPU, written beside the terms of
    the calibration it starts from (each traced term raised to the trace's bound where it was below)."""
    from cluster.calibrate import trace_grid
    from cluster.memory import TRACED_TERMS, with_trace

    base = load_calibration(args.calibration)
    out = args.out or Path(f"calibration-traced-{dt.date.today().isoformat()}.json")
    print("Tracing the full-size model's activations on fake tensors (no weights, no GPU) ...", flush=True)
    figures = trace_grid()
    cal = with_trace(base, figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cal.model_dump_json(indent=2) + "\n")
    print(f"Wrote {out}: {len(figures.cells)} cells traced in {figures.seconds:.0f} s.", flush=True)
    for term in TRACED_TERMS:
        was, now = getattr(base, term), getattr(cal, term)
        change = f"raised from {was:,.0f}" if now > was else f"kept (the trace's bound {cal.traced.bounds[term]:,.0f})"
        print(f"  {term}: {now:,.0f} ({cal.term_source(term)}; {change})", flush=True)
    for note in figures.notes:
        print(f"  note: {note}", flush=True)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    if args.trace:
        return cmd_trace(args)
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
        from cluster.pipeline import ModelNotFound

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
    p.add_argument("--trace", action="store_true",
                   help="no GPU: trace the full-size model's activations on fake tensors on this CPU (a lower bound "
                        "per grid cell) and write them beside --calibration's terms, raising any below the bound")
    p.set_defaults(func=cmd_calibrate)
