"""The autoscaling policy vs fixed replicas vs Ray Serve's default autoscaling, on 1,000 simulated cards for an hour.

`cluster/fleets/large.yaml` scaled to --cards (default 1,000) mixed consumer cards; one hour of Poisson traffic at
--rate requests/s with a diurnal swing and a few 3x bursts (autoscaling.simulate.WorkloadSpec defaults), the same
requests for every policy; the real routing code and the memory model decide where each chunk runs. Measures the
wall time of the whole run (target: under 60 s on this machine) and prints a Markdown table; with --write appends
it to docs/benchmarks.md. Target: at least 25 % fewer idle GPU-hours than fixed replicas at equal or better p95.

  .venv/bin/python -m bench.simulate_fleet [--cards 1000] [--rate 6] [--duration 3600] [--seed 1] [--write]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import commit, machine, publish

FLEET = Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "large.yaml"


SECTION = "Autoscaling on 1,000 simulated cards (`bench/simulate_fleet.py`)"
INTRO = ("The autoscaling policy vs fixed replicas vs Ray Serve's default autoscaling, in the discrete-event fleet "
         "simulator (autoscaling/simulate.py) on the same workload. Targets: one simulated hour of 1,000 cards in "
         "under 60 s; at least 25 % fewer idle GPU-hours than fixed replicas at equal or better p95.")


def main() -> None:
    from autoscaling.policy import POLICIES
    from autoscaling.simulate import WorkloadSpec, front_line, plot, simulate, table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=6.0, help="mean requests per second")
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, help="replicas per tier over time (PNG)")
    parser.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()

    started = time.perf_counter()
    results = simulate(FLEET, list(POLICIES), args.duration, WorkloadSpec(rate=args.rate), cards=args.cards,
                       seed=args.seed)
    wall = time.perf_counter() - started
    if args.plot:
        plot(results, args.plot)
    policy, base = results["policy"], results["fixed"]
    saved = 1 - policy["gpu_hours"]["idle"] / base["gpu_hours"]["idle"]
    met = saved >= 0.25 and policy["p95_s"] <= base["p95_s"]
    first = next(iter(results.values()))
    lines = [
        f"### Autoscaling on {args.cards} simulated cards, one hour",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. Fleet "
        f"`cluster/fleets/large.yaml` scaled to {args.cards} cards; {first['requests']} requests over "
        f"{args.duration:.0f} simulated s (mean {args.rate} requests/s, diurnal swing 0.6, 3x bursts, sizes 512-2048, "
        f"n 1-8, 9 steps, seed {args.seed}), the same requests for each policy; cold start 60 s, control period 10 s. "
        f"Command: `python -m bench.simulate_fleet`. Wall time of the three simulations: {wall:.1f} s "
        f"(target under 60 s: {'met' if wall < 60 else 'NOT met'}).",
        "",
        table({"policy (autoscaling/policy.py)": policy, "fixed replicas": base,
               "Ray Serve default autoscaling": results["ray_default"]}),
        "",
        f"Idle GPU-hours, policy vs fixed: {saved:.0%} fewer; p95 {policy['p95_s']} s vs {base['p95_s']} s "
        f"(target >= 25 % fewer at equal or better p95: {'met' if met else 'NOT met'}); out-of-memory with the "
        f"policy: {policy['out_of_memory']}.",
        "",
        front_line(policy["front"], policy["images_per_s"]) + ".",
        "",
    ]
    publish("\n".join(lines), args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
