"""Tier-aware routing vs "everything to the largest card" vs round-robin, on the simulated mixed fleet.

One multi-node Ray cluster (a node per simulated card, runtime.simfleet.fleet_cluster); the same workload is sent to
the service deployed with each policy in turn, at a fixed concurrency, all in one run. Simulated cards take the time
model's seconds x ZIT_SIM_TIME_SCALE (0.5 here, so the cards' speed differences, not the tiny model's CPU time,
decide) and refuse what would not fit. Reports images/s, p50/p95 latency, rejected and out-of-memory requests.
Prints a Markdown table; with --write appends it to docs/benchmarks.md.
Targets: no out-of-memory for tier-aware; at least 1.3x the throughput of sending everything to the largest card.

With --links it compares instead tier-aware routing with and without link awareness (`link_aware`, cluster/link.py)
on cluster/fleets/riser.yaml, the mixed fleet with its RTX 2060 on an x1 riser, and reports each card's share of the
work. The simulated cards always take the time their links imply; only what the service knows changes: link-aware,
the riser card's tier is stored in 8 bits (its step 7.8 s instead of 15.6 s), the tier choice and the in-tier router
see the riser's step before it has run anything; link-blind, every card is taken at the default 12 GB/s. Both
run a cold wave first (ten requests at once right after the start, before any replica has measured a step: what a
restart, a new card or a scale-up meets), then the workload, where measured steps weigh in for both.

  .venv/bin/python -m bench.fleet_routing [--requests 48] [--concurrency 10] [--links] [--write]
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
RISER_FLEET = FLEET.with_name("riser.yaml")
# The first wave after a start (--links): ten requests every tier holds, at once.
COLD = [{"prompt": f"cold {i}", "size": "768x768", "n": 2, "seed": 10_000 + i, "steps": 4} for i in range(10)]
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
    replicas: dict[str, int] = {}  # replica -> images it made
    for _, r, _ in ok:
        for chunk in r.json()["metadata"]["chunks"]:
            replicas[chunk["replica"]] = replicas.get(chunk["replica"], 0) + len(chunk["seeds"])
    return {
        "replicas": replicas,
        "images_per_s": images / wall, "megapixels_per_s": megapixels / wall, "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p95_s": percentile(latencies, 95) if latencies else float("nan"), "ok": len(ok),
        "failed": len(results) - len(ok), "oom": len(oom) + oom_retries, "wall_s": wall,
    }


SECTION = 'Tier-aware routing on the simulated mixed fleet (`bench/fleet_routing.py`)'
INTRO = 'Images per second and latency of tier-aware routing vs everything to the largest card vs round-robin tiers, on the same workload. Targets: no out-of-memory; at least 1.3x the throughput of the largest card alone.'


LINKS_SECTION = 'Link-aware routing with an x1-riser card (`bench/fleet_routing.py --links`)'
LINKS_INTRO = ('Tier-aware routing with and without the cards\' PCIe links (`link_aware`) on the mixed fleet with its '
               'RTX 2060 on an x1 riser, the same workload in one run.')


def links(args) -> None:
    """Tier-aware routing, link-aware and link-blind, on the riser fleet: throughput, latency, each card's share."""
    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig, TextEncoderSettings
    from runtime.nodes import for_links
    from runtime.simfleet import active_stage, fleet_cluster

    requests = workload(args.requests)
    rows, cold, changed = {}, {}, {}
    with fleet_cluster(RISER_FLEET, {"ZIT_SIM_TIME_SCALE": args.time_scale}) as (cards, port):
        import httpx
        from ray import serve

        url = f"http://127.0.0.1:{port}"
        for aware in (False, True):
            tiers = tiers_for_cards(cards)
            if aware:  # as zit up plans them: a tier whose slowest link streams 16 bits 1.5x slower goes to 8 bits
                tiers, changed = for_links(tiers)
            config = ServiceConfig(tiers=tiers, link_aware=aware,
                                   text_encoder=TextEncoderSettings().resolve(active_stage()))
            # Every replica changes: the old ones go first, or old and new together would need twice the simulated
            # hosts' RAM.
            serve.delete("zit")
            serve.run(build_app(config), name="zit", route_prefix="/")
            # Cold: the first wave after a start, before any replica has measured a step (a restart, a new card, a
            # scale-up): what the service knows of each card is all it has. Then the workload, measured steps and all.
            cold[aware] = run_policy(url, COLD, len(COLD))
            rows[aware] = run_policy(url, requests, args.concurrency)
            fleet = httpx.get(f"{url}/v1/fleet", timeout=60).json()
            for row in (cold[aware], rows[aware]):
                row["cards"] = {c["uuid"]: c["replicas"] for c in fleet["cards"]}
            print("link-aware" if aware else "link-blind", cold[aware], rows[aware], flush=True)

    riser = next(c for c in cards if c.pcie_width == 1)
    names = {c.uuid: f"{c.name.removeprefix('NVIDIA GeForce ')} ({c.host}, gen{c.pcie_gen} x{c.pcie_width})"
             for c in cards}

    def share(row, uuid):
        images = sum(row["replicas"].get(r, 0) for r in row["cards"].get(uuid, []))
        return images / max(1, sum(row["replicas"].values()))

    blind, aware = rows[False], rows[True]
    lines = [
        "### Link-aware routing with an x1-riser card",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. Fleet "
        f"`cluster/fleets/riser.yaml`: the mixed fleet with its RTX 2060 on a PCIe 3.0 x1 riser, one Ray node per "
        f"card; {args.requests} requests (sizes {', '.join(map(str, sorted(set(SIZES))))}, n "
        f"{', '.join(map(str, sorted(set(NS))))}, {STEPS} steps), {args.concurrency} at a time, the same workload "
        f"for both in one run; simulated time scale {args.time_scale}. The simulated cards take the time their links "
        "imply either way; link-blind is the service with `link_aware: false` (every card at the default 12 GB/s, "
        "vram_6 streaming bf16). Command: `python -m bench.fleet_routing --links`.",
        "",
        "| phase | service | images/s | megapixels/s | p50 s | p95 s | ok | failed | out-of-memory | riser card's share of images |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase, got in ((f"cold: the first {len(COLD)} requests (768x768, n 2) at once after the start", cold),
                       (f"then the workload ({args.requests} requests)", rows)):
        for label, r in (("link-blind (`link_aware: false`)", got[False]), ("link-aware", got[True])):
            lines.append(f"| {phase} | {label} | {r['images_per_s']:.2f} | {r['megapixels_per_s']:.2f} | "
                         f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['ok']} | {r['failed']} | {r['oom']} | "
                         f"{share(r, riser.uuid):.0%} |")
    lines += ["", "Share of images per card (cold wave; workload):", "",
              "| card | link-blind | link-aware |", "| --- | --- | --- |"]
    for c in cards:
        lines.append(f"| {names[c.uuid]} | {share(cold[False], c.uuid):.0%}; {share(blind, c.uuid):.0%} | "
                     f"{share(cold[True], c.uuid):.0%}; {share(aware, c.uuid):.0%} |")
    lines += ["", f"Cold wave, link-aware / link-blind: {cold[True]['images_per_s'] / cold[False]['images_per_s']:.2f}x "
                  f"images/s, p95 {cold[True]['p95_s']:.1f} s against {cold[False]['p95_s']:.1f} s. Workload, link-aware "
                  f"/ link-blind: {aware['images_per_s'] / blind['images_per_s']:.2f}x images/s, "
                  f"{aware['megapixels_per_s'] / blind['megapixels_per_s']:.2f}x megapixels/s, p95 "
                  f"{aware['p95_s']:.1f} s against {blind['p95_s']:.1f} s. Changed by the link: "
                  f"{'; '.join(changed.values()) or 'nothing'}.", ""]
    publish("\n".join(lines), args.write, LINKS_SECTION, LINKS_INTRO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--time-scale", default="0.5")
    parser.add_argument("--links", action="store_true", help="link-aware vs link-blind on cluster/fleets/riser.yaml")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if args.links:
        links(args)
        return

    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig, TextEncoderSettings
    from runtime.simfleet import active_stage, fleet_cluster

    requests = workload(args.requests)
    rows = {}
    with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": args.time_scale}) as (cards, port):
        from ray import serve

        url = f"http://127.0.0.1:{port}"
        for policy in POLICIES:
            config = ServiceConfig(tiers=tiers_for_cards(cards), tier_policy=policy,
                                   text_encoder=TextEncoderSettings().resolve(active_stage()),
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
