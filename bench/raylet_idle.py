"""Memory of an idle Ray head, with none of this project's code running: the baseline for bench/load.py's trends.

Starts a Ray head exactly as `zit up` does (cluster/local.py `start_head`, with RAY_PROCESS_ENV), deploys nothing,
sends nothing, and reads the private memory (RssAnon) of its raylet and GCS every `--every` seconds for `--minutes`.
Whatever grows here grows in Ray itself, with or without traffic. Stops every Ray process on this machine at the end
(`ray stop`), like `zit down`: run it on a machine where nothing else uses Ray.

  .venv/bin/python -m bench.raylet_idle [--minutes 10] [--every 30] [--write]
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import commit, machine, publish
from bench.load import ray_rss_bytes

SECTION = "Memory of an idle Ray head (`bench/raylet_idle.py`)"
INTRO = ("A Ray head started as `zit up` starts it, with nothing deployed and no traffic: how its raylet and GCS "
         "grow on their own. The baseline for the load benchmark's per-process trends.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between reads")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from cluster import local

    local.stop()
    local.start_head(num_cpus=1)
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - start
            mib = {role: status.get("RssAnon", 0) / 1024 for role, _, status in ray_rss_bytes().values()
                   if role in ("raylet", "gcs_server")}
            samples.append((elapsed / 60, mib))
            print(f"{elapsed / 60:5.1f} min  " + "  ".join(f"{k} {v:.1f} MiB" for k, v in sorted(mib.items())),
                  flush=True)
            if elapsed >= args.minutes * 60:
                break
            time.sleep(args.every)
    finally:
        local.stop()

    roles = sorted(samples[0][1])
    env = "; ".join(f"{key}={os.environ.get(key, 'unset')}" for key in local.RAY_PROCESS_ENV)
    lines = [
        "### Idle Ray head",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. {env}. Command: "
        f"`python -m bench.raylet_idle --minutes {args.minutes:g} --every {args.every:g}`.",
        "",
        "| minute | " + " | ".join(f"{role} MiB" for role in roles) + " |",
        "| --- | " + " | ".join("---" for _ in roles) + " |",
    ]
    for minute, mib in samples:
        lines.append(f"| {minute:.1f} | " + " | ".join(f"{mib.get(role, 0):.1f}" for role in roles) + " |")
    half = len(samples) // 2
    growth = {role: samples[-1][1][role] / samples[half][1][role] - 1 for role in roles}
    lines += ["", f"Second half of the run (minute {samples[half][0]:.1f} to {samples[-1][0]:.1f}), with nothing "
                  "running: " + ", ".join(f"{role} {g * 100:+.1f} %" for role, g in growth.items()) + ".", ""]
    publish("\n".join(lines), args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
