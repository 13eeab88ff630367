"""`zit simulate`: compare the autoscaling policy with the baselines on a simulated fleet and workload.

  zit simulate --fleet cluster/fleets/large.yaml --cards 1000 --rate 12 --duration 3600 [--policy all] [--plot p.png]
  zit simulate --fleet cluster/fleets/mixed.yaml --workload trace.yaml --duration 600 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_simulate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from autoscaling.policy import POLICIES, PolicyConfig
    from autoscaling.simulate import WorkloadSpec, front_line, load_workload, plot, simulate, table

    try:
        workload = load_workload(args.workload) if args.workload else WorkloadSpec(rate=args.rate)
    except (OSError, ValidationError, ValueError) as exc:
        print(f"error: bad workload file {args.workload}: {exc}", flush=True)
        return 2
    policies = list(POLICIES) if args.policy == "all" else [args.policy]
    try:
        results = simulate(args.fleet, policies, args.duration, workload, cards=args.cards, seed=args.seed,
                           config=PolicyConfig(), cold_start_s=args.cold_start_s, text_encoder=args.text_encoder)
    except (OSError, ValidationError) as exc:
        print(f"error: bad fleet file {args.fleet}: {exc}", flush=True)
        return 2
    if args.plot:
        where = plot(results, args.plot)
        if not args.json:
            print(f"replicas over time: {where}")
    if args.json:
        for r in results.values():
            if not args.timeline:
                r.pop("replicas_over_time")
        print(json.dumps([{"policy": name, **r} for name, r in results.items()], indent=2))
        return 0
    first = next(iter(results.values()))
    print(f"{first['cards']} cards, {first['requests']} requests over {args.duration:.0f} simulated s, seed {args.seed}")
    stage = first["text_encoder"]
    print(f"text encoder: {stage['where']}, {stage['encodes_per_request']} encodes per request"
          + (f", cache hits {stage['cache_hit_ratio']:.0%}" if stage.get("cache_hit_ratio") is not None else ""))
    print(table(results))
    print(front_line(first["front"], max(r["images_per_s"] for r in results.values())))
    return 0


def add_simulate_parser(sub) -> None:
    from autoscaling.simulate import COLD_START_S

    p = sub.add_parser("simulate", help="simulate a fleet under a workload and compare autoscaling policies")
    p.add_argument("--fleet", type=Path, required=True, help="fleet file (cluster/fleets/*.yaml)")
    p.add_argument("--cards", type=int, help="scale the fleet file's mix of cards to this many cards")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--workload", type=Path, help="workload file (JSON or YAML; autoscaling.simulate.WorkloadSpec)")
    load.add_argument("--rate", type=float, help="mean requests per second (Poisson, diurnal swing and bursts)")
    p.add_argument("--duration", type=float, required=True, help="simulated seconds of arrivals")
    p.add_argument("--policy", default="all", choices=["all", "policy", "fixed", "ray_default"],
                   help="which policy to run (default: all, on the same workload)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the workload (default %(default)s)")
    p.add_argument("--cold-start-s", type=float, default=COLD_START_S, help="model load time of a new replica")
    p.add_argument("--text-encoder", choices=["auto", "local", "cpu"], default="auto",
                   help="where the text encoder runs: auto (a stage on the card with the most to spare, as zit up "
                        "places it), local (in every generator), cpu (a stage on the head's CPU)")
    p.add_argument("--plot", type=Path, help="write replicas per tier over time here (PNG, or HTML without matplotlib)")
    p.add_argument("--json", action="store_true", help="one JSON record per policy")
    p.add_argument("--timeline", action="store_true", help="with --json: include replicas over time")
    p.set_defaults(func=cmd_simulate)
