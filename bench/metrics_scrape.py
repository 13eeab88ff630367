"""Scrape cost: how long `GET /metrics` takes to render as the fleet grows, measured side by side in one run.

The ingress renders its ServiceMetrics (deployments/metrics.py) on every scrape: request and chunk histograms for
every tier and route, queue gauges, and one set of gauges per card from the fleet registry's last reports. This
benchmark fills a ServiceMetrics like a busy service (every tier, route and status seen; retries between tiers) and
feeds it synthetic registry reports for 0, 10, 100 and 1000 cards, then times `render()` (the whole body of the
route; nothing else runs on a scrape) for each size, interleaved. Target: under 50 ms with 100 cards.

  .venv/bin/python -m bench.metrics_scrape [--scrapes 200] [--write]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone

from bench.common import commit, machine, percentile, publish

SIZES = (0, 10, 100, 1000)
TARGET_MS = 50.0
ENDPOINTS = ("/v1/images/generations", "/sdapi/v1/txt2img", "/v1/models", "/v1/fleet", "/healthz", "/v1/images/{name}")


def synthetic_reports(count: int) -> list[dict]:
    """`count` replica reports cycling through the large fleet's cards, each with its own uuid and a live reading."""
    from pathlib import Path

    from cluster.nvml import load_fleet

    base = load_fleet(Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "large.yaml")
    rng = random.Random(7)
    reports = []
    for i in range(count):
        card = base[i % len(base)]
        used = int(card.memory_total * rng.uniform(0.2, 0.97))
        snapshot = replace(card, index=i % 8, uuid=f"GPU-bench-{i:05d}", host=f"host-{i // 8:03d}",
                           memory_used=used, memory_free=card.memory_total - used,
                           utilization_pct=rng.choice([0.0, 100.0]), temperature_c=rng.uniform(35, 80),
                           power_w=rng.uniform(20, 400))
        reports.append({"replica": f"replica-{i}", "tier": card.tier, "busy": bool(i % 2), "card": snapshot.to_dict()})
    return reports


def busy_metrics(reports: list[dict]):
    """A ServiceMetrics for the tiers of these cards with every label combination a busy service would have."""
    from cluster.requests import GenerationResult
    from cluster.tiers import VRAM_TIERS_GIB, TierConfig
    from deployments.metrics import ServiceMetrics
    from deployments.scheduler import TierQueue

    tiers = [TierConfig(name=name, num_replicas=4) for name in VRAM_TIERS_GIB]
    metrics = ServiceMetrics(tiers)
    rng = random.Random(11)
    names = [t.name for t in tiers]
    for _ in range(2000):
        tier = rng.choice(names)
        metrics.request_done(rng.choice(ENDPOINTS), rng.choice([200, 200, 200, 422, 503, 504]), tier,
                             rng.uniform(0.05, 90))
        metrics.queue_waited(tier, rng.uniform(0, 20))
        result = GenerationResult(images=[b""] * rng.randint(1, 4), seeds=[1], tier=tier, replica="r", device="cuda",
                                  seconds=1.0, seconds_per_step=rng.uniform(0.01, 5), degraded=rng.random() < 0.02)
        metrics.chunk_done(tier, result, rng.uniform(0.1, 120))
        metrics.fitting_tiers(names[names.index(tier):])
    for reason in ("out_of_memory", "bad_image", "replica_died"):
        for a in names:
            for b in names:
                metrics.retried(reason, a, b)
                metrics.chunk_failed(a, reason)
    metrics.fleet.watch_queues({t.name: TierQueue(t.name, 4, 32) for t in tiers})
    metrics.fleet.observe_reports(reports)
    return metrics


SECTION = "Metrics scrape cost (`bench/metrics_scrape.py`)"
INTRO = ("Time to render `GET /metrics` on the ingress (deployments/metrics.py) as the fleet grows, with card readings "
         "from synthetic fleet registry reports. Target: under 50 ms with 100 cards.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=200, help="renders per fleet size")
    parser.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()

    services = {size: busy_metrics(synthetic_reports(size)) for size in SIZES}
    for metrics in services.values():  # warm up
        metrics.render()
    timings: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(args.scrapes):  # interleaved, so machine noise hits every size alike
        for size, metrics in services.items():
            started = time.perf_counter()
            metrics.render()
            timings[size].append((time.perf_counter() - started) * 1000)
    rows = []
    for size in SIZES:
        body = services[size].render()[0]
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        values = timings[size]
        rows.append(f"| {size} | {samples} | {len(body) / 1024:.0f} | {statistics.median(values):.2f} | "
                    f"{percentile(values, 95):.2f} | {max(values):.2f} |")
    p95_100 = percentile(timings[100], 95)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join([
        "### Scrape cost of GET /metrics by fleet size (`bench/metrics_scrape.py`)",
        "",
        f"{now}, commit {commit()}, {machine()}. {args.scrapes} renders per size, interleaved. A busy service: 6 "
        f"tiers x 6 routes x 4 statuses seen, retries between every pair of tiers. Command: "
        f"`python -m bench.metrics_scrape`.",
        "",
        "| cards | samples | KiB | p50 ms | p95 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Target: under {TARGET_MS:.0f} ms with 100 cards; p95 {p95_100:.2f} ms "
        f"({'met' if p95_100 < TARGET_MS else 'NOT met'}).",
        "",
    ])
    publish(report, args.write, SECTION, INTRO)

if __name__ == "__main__":
    main()
