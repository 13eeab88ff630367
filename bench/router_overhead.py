"""Router overhead: p50/p95 of a trivial request through VramAwareRouter vs Ray's default PowerOfTwoChoices router.

Two copies of one trivial deployment (two replicas each, publishing the same routing stats a Generator does), one
per router, called from this driver through deployment handles, interleaved request by request in one run.
Prints a Markdown table; with --write appends it to docs/benchmarks.md. Target: ratio <= 1.05 at p50.

  .venv/bin/python bench/router_overhead.py [--requests 1000] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.common import commit, machine, percentile, publish


class Echo:
    """A trivial replica that reports routing stats like a Generator on a 12 GB card."""

    async def __call__(self, job) -> int:
        return 1

    def record_routing_stats(self) -> dict:
        return {"capacity_bytes": 12 << 30, "free_bytes": 8 << 30, "busy": False, "seconds_per_step": 0.01}


SECTION = 'Router overhead (`bench/router_overhead.py`)'
INTRO = "p50 latency of a trivial request through VramAwareRouter vs Ray's default PowerOfTwoChoices router on the same deployment. Target: ratio <= 1.05."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from cluster.requests import GenerationJob
    from deployments.router import ZIT_ROUTING_STATS_PERIOD_S, VramAwareRouter
    from runtime.local import HEAD_RESOURCES

    ray.init(address="local", num_cpus=4, resources=HEAD_RESOURCES, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    handles = {}
    for name, router in (("vram_aware", VramAwareRouter), ("power_of_two", None)):
        config = RequestRouterConfig(request_routing_stats_period_s=ZIT_ROUTING_STATS_PERIOD_S,
                                     **({"request_router_class": router} if router else {}))
        app = serve.deployment(Echo).options(name=f"Echo_{name}", num_replicas=2, request_router_config=config,
                                             ray_actor_options={"num_cpus": 0.5}).bind()
        handles[name] = serve.run(app, name=name, route_prefix=f"/{name}")
    time.sleep(2 * ZIT_ROUTING_STATS_PERIOD_S)  # let the routers see the replicas' stats
    job = GenerationJob(prompt="x", width=512, height=512, steps=9, guidance_scale=0.0, seeds=[1],
                        predicted_peak=4 << 30)
    timings = {name: [] for name in handles}
    for i in range(args.warmup + args.requests):
        for name, handle in handles.items():
            started = time.perf_counter()
            handle.remote(job).result()
            if i >= args.warmup:
                timings[name].append(time.perf_counter() - started)
    serve.shutdown()
    ray.shutdown()

    p50 = {name: statistics.median(values) for name, values in timings.items()}
    p95 = {name: percentile(values, 95) for name, values in timings.items()}
    ratio = p50["vram_aware"] / p50["power_of_two"]
    report = "\n".join([
        "### Router overhead, trivial request, 2 replicas",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}, {args.requests} "
        f"requests each (after {args.warmup} warm-up), interleaved, through deployment handles from one driver. "
        "Command: `python -m bench.router_overhead`.",
        "",
        "| router | p50 ms | p95 ms |",
        "| --- | --- | --- |",
        f"| Ray default (PowerOfTwoChoices) | {p50['power_of_two'] * 1000:.2f} | {p95['power_of_two'] * 1000:.2f} |",
        f"| VramAwareRouter | {p50['vram_aware'] * 1000:.2f} | {p95['vram_aware'] * 1000:.2f} |",
        "",
        f"Ratio VramAwareRouter / default at p50: {ratio:.3f}. Target <= 1.05 ({'met' if ratio <= 1.05 else 'NOT met'}).",
        "",
    ])
    publish(report, args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
