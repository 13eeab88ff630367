"""Calibrate the memory model on one big NVIDIA GPU in a single call of at most 8 minutes.

What it does: builds the full-size Z-Image-Turbo (6.15 B transformer, Qwen3-4B text encoder, Flux VAE) with random
bf16 weights (no download), then for every tier profile (bf16 and float32 variants) runs 512x512 n=1, the largest
square the memory model accepts at n=1, and 1024x1024 (or that largest side) at the largest accepted batch, each
under `torch.cuda.set_per_process_memory_fraction` set to the tier's nominal VRAM minus the CUDA context, so a big
card behaves like the tier's card. It records peak allocated/reserved memory per phase, NVML used memory and
seconds per image, asserts that no run the model accepted ran out of memory, fits the coefficients, and writes
  $OUT/calibration.json   the measured calibration (copy to cluster/calibration/ and commit, with the card named)
  $OUT/calibration.jsonl  one JSON line per run (the raw log)
Exit code 1 when a run predicted to fit ran out of memory (the model is then too optimistic: fix it first).

Steps on the GPU machine (no internet there; diffusers and friends travel as wheels):
1. Here, on a connected machine, download the wheels for the device's Python (3.11 shown; the binary ones are
   abi3 or per version, so match `python3 -V` on the device):
     pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 \\
         -d wheels/ -r bench/gpu_wheels.txt
   (plain `pip download --no-deps -d wheels/ -r bench/gpu_wheels.txt` when this machine's Python and platform
   match the device's.)
2. On the device, in one call, with wheels/ carried along with the working tree:
     pip install --no-index --find-links wheels -r bench/gpu_wheels.txt && \\
         ZIT_CACHE_DIR=/tmp/zit python bench/gpu_calibrate.py --out "$OUT"
   The run prints one line per measurement and a summary table; it stops starting runs after --deadline-s.
Dry run here (CPU, tiny model, nothing measured): python bench/gpu_calibrate.py --dry-run --out /tmp/cal
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# One device call may run 8 minutes; building the random weights takes about one, and writing the results seconds.
# Runs start until this many seconds have passed since the script began.
DEFAULT_DEADLINE_S = 400.0


def priority_grid(tiers, cal, device: str, dry_run: bool):
    """Runs in the order that matters: each tier's typical card first (no bf16 on 4/6 GB), then the other variant."""
    from cluster.planning import NO_BF16_TIERS, calibration_profiles, largest_request_grid

    if dry_run:  # tiny model on a CPU: two small sizes per profile exercise the same path in seconds
        return [(t, p, s, s, n) for t, p in calibration_profiles(tiers, [True, False], device)
                for s, n in ((64, 1), (128, min(2, p.max_n)))]
    typical = [g for t in tiers for g in largest_request_grid([t], [t not in NO_BF16_TIERS], device, cal)]
    other = [g for t in tiers for g in largest_request_grid([t], [t in NO_BF16_TIERS], device, cal)]
    return typical + other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="folder (default $OUT)")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="start no run after this")
    parser.add_argument("--tiers", help="comma-separated tiers (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, nothing measured")
    args = parser.parse_args(argv)

    import torch

    from cluster.memory import GIB, load_calibration
    from cluster.planning import (
        CALIBRATION_STEPS, full_size_pipeline_factory, run_calibration, tiny_pipeline_factory, write_calibration,
    )
    from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes

    started = time.monotonic()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; this script calibrates on a GPU (use --dry-run to try it on a CPU)")
        return 2
    # 1. Weights: full-size random on the GPU, or the tiny model for a dry run.
    if args.dry_run:
        factory = tiny_pipeline_factory()
    else:
        print(f"{torch.cuda.get_device_name(0)}: drawing full-size random weights ...", flush=True)
        factory = full_size_pipeline_factory("cuda")
        print(f"weights ready in {time.monotonic() - started:.0f} s", flush=True)
    # 2. The grid, each tier emulated at its nominal VRAM.
    cal = load_calibration()
    tiers = args.tiers.split(",") if args.tiers else list(VRAM_TIERS_GIB)
    grid = priority_grid(tiers, cal, device, args.dry_run)
    emulate = (lambda tier: None) if args.dry_run else tier_vram_bytes
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "calibration.jsonl"
    log_path.unlink(missing_ok=True)
    remaining = args.deadline_s - (time.monotonic() - started)
    records = run_calibration(factory, grid, device, 1 if args.dry_run else CALIBRATION_STEPS, log_path, emulate,
                              remaining, cal)
    # 3. Summary and the fitted calibration.
    print(f"\n{'profile':<14}{'size':>10}{'n':>3}{'measured GiB':>14}{'predicted GiB':>15}{'s/image':>9}")
    for r in records:
        if "skipped" in r:
            status = f"skipped: {r['skipped']}"
        elif r.get("oom"):
            status = "OUT OF MEMORY"
        else:
            measured = (r.get("reserved_peak_bytes") or 0) + (r.get("context_bytes") or 0)
            status = f"{measured / GIB:>14.2f}{r['predicted_bytes'] / GIB:>15.2f}{r['seconds_per_image']:>9.2f}"
        print(f"{r['profile']['name']:<14}{r['width']:>5}x{r['height']:<4}{r['n']:>3}{status}")
    code = write_calibration(records, cal, factory, device, args.out / "calibration.json", full=not args.dry_run,
                             dry_run=args.dry_run)
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
