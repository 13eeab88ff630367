"""Tier-aware routing vs "everything to the largest card" vs round-robin, on the simulated mixed fleet.

One multi-node Ray cluster (a node per simulated card, runtime.simfleet.fleet_cluster); the same workload is sent to
the service deployed with each policy in turn, at a fixed concurrency, all in one run. Simulated cards take the time
model's seconds x ZIT_SIM_TIME_SCALE (0.5 here, so the cards' speed differences, not the tiny model's CPU time,
decide) and refuse what would not fit. Reports images/s, p50/p95 latency, rejected and out-of-memory requests.
Prints a Markdown table; with --write appends it to docs/benchmarks.md.
Targets: no out-of-memory for tier-aware; at least 1.3x the throughput of sending everything to the largest card.

  .venv/bin/python -m bench.fleet_routing [--requests 48] [--concurrency 10] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import commit, machine, percentile, publish

FLEET = Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "mixed.yaml"
POLICIES = ("tier_aware", "largest", "round_robin")
# The mix of the routing system test (tests/system/test_routing.py): sizes 512 to 2048, n 1 to 8, most requests
# small. The large ones are what a card of the wrong tier cannot hold.
SIZES = (512, 512, 768, 1024, 1024, 1536, 2048)
NS = (1, 1, 2, 4, 8)
STEPS = 4


def workload(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"bench {i}", "size": f"{side}x{side}", "n": rng.choice(NS), "seed": i * 10,
             "steps": STEPS} for i, side in enumerate(rng.choice(SIZES) for _ in range(count))]


def run_policy(url: str, requests: list[dict], concurrency: int) -> dict:
    import httpx

    def one(body):
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=900)
        return body, response, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - started
    ok = [(b, r, t) for b, r, t in results if r.status_code == 200]
    oom = [b for b, r, _ in results if r.status_code != 200 and "out_of_memory" in r.text]
    latencies = [t for _, _, t in ok]
    images = sum(b["n"] for b, _, _ in ok)
    # Images of 2048x2048 are 16 times the work of 512x512: delivered megapixels per second weigh them so, and a
    # policy that fails the largest requests gains nothing by it.
    megapixels = sum(b["n"] * int(b["size"].split("x")[0]) * int(b["size"].split("x")[1]) for b, _, _ in ok) / 1e6
    # Out-of-memory events that requests survived: a retry elsewhere, or a degraded rerun on the same card.
    oom_retries = sum(1 for _, r, _ in ok for x in r.json()["metadata"]["retries"] if x["reason"] == "out_of_memory")
    oom_retries += sum(1 for _, r, _ in ok for c in r.json()["metadata"]["chunks"] if c.get("degraded"))
    return {
        "images_per_s": images / wall, "megapixels_per_s": megapixels / wall, "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": percentile(latencies, 95) if latencies else float("nan"), "ok": len(ok),
        "failed": len(results) - len(ok), "oom": len(oom) + oom_retries, "wall_s": wall,
    }


SECTION = 'Tier-aware routing on the simulated mixed fleet (`bench/fleet_routing.py`)'
INTRO = 'Images per second and latency of tier-aware routing vs everything to the largest card vs round-robin tiers, on the same workload. Targets: no out-of-memory; at least 1.3x the throughput of the largest card alone.'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--time-scale", default="0.5")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig
    from runtime.simfleet import fleet_cluster

    requests = workload(args.requests)
    rows = {}
    with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": args.time_scale}) as (cards, port):
        from ray import serve

        url = f"http://127.0.0.1:{port}"
        for policy in POLICIES:
            config = ServiceConfig(tiers=tiers_for_cards(cards), tier_policy=policy,
                                   in_tier_router="vram_aware" if policy == "tier_aware" else "ray_default")
            serve.run(build_app(config), name="zit", route_prefix="/")
            run_policy(url, requests[:4], 4)  # warm-up: pipelines loaded, first step times measured
            rows[policy] = run_policy(url, requests, args.concurrency)
            print(policy, rows[policy], flush=True)

    base = rows["largest"]["images_per_s"]
    ratio = rows["tier_aware"]["images_per_s"] / base
    lines = [
        "### Tier-aware routing on the simulated mixed fleet",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. Fleet "
        f"`cluster/fleets/mixed.yaml` (GTX 1650, RTX 2060, RTX 3070, RTX 3060, RTX 4090), one Ray node per card; "
        f"{args.requests} requests (sizes {', '.join(map(str, sorted(set(SIZES))))}, n {', '.join(map(str, sorted(set(NS))))}, "
        f"{STEPS} steps), {args.concurrency} at "
        f"a time, the same workload for each policy in one run; simulated time scale {args.time_scale}. "
        "Command: `python -m bench.fleet_routing`.",
        "",
        "Out-of-memory counts every event: failed requests, retries elsewhere and degraded reruns on the same card.",
        "",
        "| policy | images/s | megapixels/s | p50 s | p95 s | ok | failed | out-of-memory |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"tier_aware": "tier-aware (memory model + load, VramAwareRouter)",
             "largest": "everything to the largest card", "round_robin": "round-robin tiers, Ray's default router"}
    for policy in POLICIES:
        r = rows[policy]
        lines.append(f"| {names[policy]} | {r['images_per_s']:.2f} | {r['megapixels_per_s']:.2f} | {r['p50_s']:.2f} "
                     f"| {r['p95_s']:.2f} | {r['ok']} "
                     f"| {r['failed']} | {r['oom']} |")
    lines += ["", f"Throughput tier-aware / largest-only: {ratio:.2f}x (target >= 1.3x: "
                  f"{'met' if ratio >= 1.3 else 'NOT met'}); out-of-memory with tier-aware: {rows['tier_aware']['oom']} "
                  f"(target 0: {'met' if rows['tier_aware']['oom'] == 0 else 'NOT met'}).", ""]
    report = "\n".join(lines)
    publish(report, args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
