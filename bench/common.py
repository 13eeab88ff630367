"""What every benchmark shares: percentiles, the machine and commit it ran on, and publishing its report into its
own section of docs/benchmarks.md (newest result last in the section)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {gpu}, {platform.system()} {platform.release()}"


def publish(report: str, write: bool, section: str, intro: str) -> None:
    """Print `report`; with `write`, put it at the end of `section` in docs/benchmarks.md (created with `intro`)."""
    print(report, flush=True)
    if not write:
        return
    heading = f"## {section}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = "\n" + report.rstrip() + "\n"
    if heading not in text:
        text = text.rstrip() + f"\n\n{heading}\n\n{intro.strip()}\n" + block
    else:
        start = text.index(heading) + len(heading)
        end = text.find("\n## ", start)
        end = len(text) if end < 0 else end
        text = text[:end].rstrip() + "\n" + block + text[end:]
    DOCS.write_text(text)
