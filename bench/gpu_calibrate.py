"""Calibrate the memory model on one big NVIDIA GPU in a single call of at most 8 minutes.

What it does: builds the full-size Z-Image-Turbo (6.15 B transformer, Qwen3-4B text encoder, Flux VAE) with random
bf16 weights (no download), then for every tier profile (bf16 and float32 variants) runs 512x512 n=1, the largest
square the memory model accepts at n=1, and 1024x1024 (or that largest side) at the largest accepted batch, each
under `torch.cuda.set_per_process_memory_fraction` set to the tier's nominal VRAM minus the CUDA context, so a big
card behaves like the tier's card. It records peak allocated/reserved memory per phase, NVML used memory and
seconds per image, asserts that no run the model accepted ran out of memory, fits the coefficients, and writes
  $OUT/calibration.json   the measured calibration (copy to cluster/calibration/ and commit, with the card named)
  $OUT/calibration.jsonl  one JSON line per run (the raw log)
Exit code 1 when a run predicted to fit ran out of memory (the model is then too optimistic: fix it first) or too
few runs ended to fit; 3 when it was stopped (SIGTERM, or its own --hard-stop-s) before its grid was done: the
summary and calibration of the runs that ended are still printed and written.

Time: a profile (or a run) starts only when the slowest one so far is expected to end before --deadline-s
(cluster.planning.TimeBudget), so the last one ends by about DEFAULT_DEADLINE_S after the script starts; the rest are
listed as skipped. The deadline leaves room in an 8-minute call for installing the wheels and starting Python before
the script (about 30 s) and for a last profile slower than any before it.

Steps on the GPU machine (no internet there). Its image has Python 3.12 with CUDA PyTorch, transformers, accelerate,
huggingface_hub, numpy, pillow and the rest; bench/gpu_wheels.txt lists what it lacks (diffusers, pydantic), about
9 MB of wheels:
1. Here, on a connected machine, in the repository root, download those wheels for the device's Python and platform
   (pip matches each manylinux tag exactly, so several are named; the pure-Python wheels match any):
     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
         --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r bench/gpu_wheels.txt
   (.whl/ is kept out of git: `echo /.whl/ >> .git/info/exclude`.) Check the device's `python3 -V` first: for
   another version, change --python-version (pydantic_core is the one wheel built per version).
2. On the device, in one call of at most 8 minutes, with .whl/ copied along with the working tree:
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
         .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 ZIT_CACHE_DIR=/tmp/zit \\
         timeout -k 10 470 python3 bench/gpu_calibrate.py --out "$OUT"
   The run prints one line per measurement and a summary table.
Dry run here (CPU, tiny model, nothing measured): python bench/gpu_calibrate.py --dry-run --out /tmp/cal
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# One device call may run 8 minutes (480 s). Before this script starts, installing the wheels and starting Python take
# about 30 s; in it, drawing the random weights takes about a minute of this deadline, fitting and writing seconds.
# Every run should have ended this many seconds after the script starts (TimeBudget keeps a margin for a profile
# slower than those before it).
DEFAULT_DEADLINE_S = 330.0
# Should a run hang or overrun anyway, the script stops itself here and writes what it has: still inside the call,
# and before the `timeout 470` of the recipe kills it.
HARD_STOP_S = 420.0


class Stopped(BaseException):
    """The script was told to stop (SIGTERM, or its own hard stop) before its grid was done. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def priority_grid(tiers, cal, device: str, dry_run: bool):
    """Runs in the order that matters: each tier's typical card first (no bf16 on 4/6 GB), then the other variant."""
    from cluster.calibrate import calibration_profiles, largest_request_grid
    from cluster.tiers import NO_BF16_TIERS

    if dry_run:  # tiny model on a CPU: two small sizes per profile exercise the same path in seconds
        return [(t, p, s, s, n) for t, p in calibration_profiles(tiers, [True, False], device)
                for s, n in ((64, 1), (128, min(2, p.max_n)))]
    typical = [g for t in tiers for g in largest_request_grid([t], [t not in NO_BF16_TIERS], device, cal)]
    other = [g for t in tiers for g in largest_request_grid([t], [t in NO_BF16_TIERS], device, cal)]
    return typical + other


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="folder (default $OUT)")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds from the start by which every run should have ended (default %(default)s)")
    parser.add_argument("--hard-stop-s", type=float, default=HARD_STOP_S,
                        help="seconds from the start after which the script stops and writes what it has")
    parser.add_argument("--tiers", help="comma-separated tiers (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, nothing measured")
    args = parser.parse_args(argv)

    # From here on, SIGTERM and the hard stop raise Stopped: the runs that ended are still summarised and fitted.
    handlers = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_REAL, max(0.001, args.hard_stop_s - (time.monotonic() - started)))
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "calibration.jsonl"
    log_path.unlink(missing_ok=True)
    records, stopped, factory = [], None, None
    try:
        import torch

        from cluster.calibrate import (
            CALIBRATION_STEPS,
            full_size_pipeline_factory,
            run_calibration,
            tiny_pipeline_factory,
        )
        from cluster.memory import load_calibration
        from cluster.tiers import VRAM_TIERS_GIB, tier_vram_bytes

        cal = load_calibration()
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
        # 2. The grid, each tier emulated at its nominal VRAM, within the time left.
        tiers = args.tiers.split(",") if args.tiers else list(VRAM_TIERS_GIB)
        grid = priority_grid(tiers, cal, device, args.dry_run)
        emulate = (lambda tier: None) if args.dry_run else tier_vram_bytes
        remaining = args.deadline_s - (time.monotonic() - started)
        records = run_calibration(factory, grid, device, 1 if args.dry_run else CALIBRATION_STEPS, log_path, emulate,
                                  remaining, cal)
    except Stopped as exc:
        stopped = str(exc)
        print(f"\nSTOPPED by {stopped} after {time.monotonic() - started:.0f} s; the runs that ended:", flush=True)
        records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    # 3. Summary and the fitted calibration (also of a stopped run's records).
    return summarise(records, args, factory, started, stopped)


def summarise(records: list[dict], args, factory, started: float, stopped: str | None) -> int:
    """Print the table of `records` and write the calibration; the exit code (see the module docstring)."""
    from cluster.calibrate import write_calibration
    from cluster.memory import GIB, load_calibration

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
    device = "cpu" if args.dry_run else "cuda"
    code = write_calibration(records, load_calibration(), factory, device, args.out / "calibration.json",
                             full=not args.dry_run, dry_run=args.dry_run)
    print(f"done in {time.monotonic() - started:.0f} s" + (f" (stopped by {stopped})" if stopped else ""), flush=True)
    return 3 if stopped and code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
