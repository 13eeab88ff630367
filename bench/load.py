"""Load test on loopback: the simulated mixed fleet at several concurrency levels, bounded in count and time.

For each level: throughput, p50/p95/p99 latency, how many requests were turned away (503 + Retry-After once every
tier that could serve is full; the tiers' queues are kept short here, 4, so saturation shows), and lost requests
(anything that is neither a 200 with all its images nor a 503 with Retry-After: must be 0). Memory: the RSS of every
Ray process is sampled after a warm-up level at the highest concurrency and at the end; the growth must stay
under 5 %.
Prints a Markdown table; with --write appends it to docs/benchmarks.md.

  .venv/bin/python -m bench.load [--levels 2,8,32] [--requests 40] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import commit, machine, percentile, publish

FLEET = Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "mixed.yaml"


def ray_rss_bytes() -> dict[int, int]:
    """RSS of every Ray process on this machine (raylets, GCS, workers, replicas)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray::" in cmd or "raylet" in (proc.info["name"] or "") or "gcs_server" in (proc.info["name"] or ""):
            if proc.info["memory_info"]:
                out[proc.info["pid"]] = proc.info["memory_info"].rss
    return out


def run_level(url: str, concurrency: int, count: int) -> dict:
    import httpx

    def one(i: int):
        body = {"prompt": f"load {i}", "size": "512x512", "n": 1 + i % 2, "steps": 4, "seed": i}
        started = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
        except httpx.HTTPError as exc:
            return body, None, str(exc), time.perf_counter() - started
        return body, response, None, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    ok = [(b, r, t) for b, r, _, t in results if r is not None and r.status_code == 200
          and len(r.json()["data"]) == b["n"]]
    turned_away = [r for _, r, _, _ in results if r is not None and r.status_code == 503 and r.headers.get("retry-after")]
    lost = len(results) - len(ok) - len(turned_away)
    latencies = [t for _, _, t in ok]
    return {
        "concurrency": concurrency, "requests": count, "images_per_s": sum(b["n"] for b, _, _ in ok) / wall,
        "p50": statistics.median(latencies), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
        "ok": len(ok), "rejected": len(turned_away), "lost": lost,
    }


SECTION = 'Load, rejections and memory (`bench/load.py`)'
INTRO = "A bounded load on loopback at several concurrency levels: throughput, latency, 503 + Retry-After once saturated, lost requests (target 0), growth of the Ray processes' memory (target under 5 %)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="2,8,32")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--time-scale", default="0.1")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    from cluster.local import fleet_cluster
    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig

    rows = []
    with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": args.time_scale}) as (cards, port):
        from ray import serve

        tiers = [t.model_copy(update={"max_queued_requests": 4}) for t in tiers_for_cards(cards)]
        serve.run(build_app(ServiceConfig(tiers=tiers)), name="zit", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        levels = [int(x) for x in args.levels.split(",")]
        # Warm-up at the highest level: every replica has run, queues have filled, allocators have grown.
        run_level(url, max(levels), args.requests)
        before = ray_rss_bytes()
        for level in levels:
            rows.append(run_level(url, level, args.requests))
            print(rows[-1], flush=True)
        after = ray_rss_bytes()
    common = set(before) & set(after)
    growth = (sum(after[p] for p in common) - sum(before[p] for p in common)) / sum(before[p] for p in common)
    worst = max(((after[p] - before[p]) / before[p], p) for p in common)
    lines = [
        "### Load on the simulated mixed fleet",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. Fleet "
        f"`cluster/fleets/mixed.yaml`, one Ray node per card, tier queues of 4; {args.requests} requests of 512x512 "
        f"(n 1-2, 4 steps) per level, simulated time scale {args.time_scale}. Command: `python -m bench.load`.",
        "",
        "| concurrency | images/s | p50 s | p95 s | p99 s | ok | 503 + Retry-After | lost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                     f"{r['p99']:.2f} | {r['ok']} | {r['rejected']} | {r['lost']} |")
    lines += ["", f"RSS of the {len(common)} Ray processes alive throughout: {growth * 100:+.1f} % from the first level "
                  f"to the end, after a warm-up level (largest single process: {worst[0] * 100:+.1f} %). Target: under 5 % "
                  f"({'met' if growth < 0.05 else 'NOT met'}); lost requests: {sum(r['lost'] for r in rows)} (target 0).",
              ""]
    report = "\n".join(lines)
    publish(report, args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
