"""What the Serve path adds to one generation: HTTP -> proxy -> Ingress -> Generator vs the same pipeline call in-process.

Both sides run the tiny model at 256x256 with 9 steps, interleaved request by request in one run so machine noise hits
both alike. The replica gets the same number of torch threads as this process. Prints a Markdown table; with
--write it also appends it to docs/benchmarks.md.

  .venv/bin/python -m bench.serve_overhead [--requests 60] [--size 256x256] [--write]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from datetime import datetime, timezone

from bench.common import commit, machine, percentile, publish

SECTION = 'Serve path overhead (`bench/serve_overhead.py`)'
INTRO = "What HTTP, the Serve proxy, the Ingress and the handle call to a Generator replica add to one generation, against the same pipeline call in the benchmark's own process. Target: under 30 ms at p50."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    import httpx
    import ray
    import torch
    from ray import serve

    from cluster.pipeline import load_pipeline, resolve_model, run_job
    from cluster.requests import GenerationJob, parse_size
    from cluster.tiers import TierConfig
    from deployments.app import build_app
    from deployments.config import ServiceConfig
    from runtime.local import HEAD_RESOURCES

    width, height = parse_size(args.size)
    threads = torch.get_num_threads()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    # 1. The service: one CPU replica with as many torch threads as this process (Ray sets them from num_cpus).
    ray.init(address="local", num_cpus=max(threads, 2), resources=HEAD_RESOURCES, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    config = ServiceConfig(tiers=[TierConfig(name="cpu", num_cpus=threads)])
    serve.run(build_app(config), name="zit", route_prefix="/")
    # 2. The same pipeline in this process.
    pipe = load_pipeline(resolve_model("tiny"))

    body = {"prompt": "a red fox in the snow", "size": args.size, "steps": args.steps, "seed": 1}
    job = GenerationJob(prompt=body["prompt"], width=width, height=height, steps=args.steps, guidance_scale=0.0,
                        seeds=[1])
    http_s, local_s = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for i in range(args.warmup + args.requests):
            started = time.perf_counter()
            response = client.post("/v1/images/generations", json=body)
            elapsed_http = time.perf_counter() - started
            assert response.status_code == 200, response.text
            started = time.perf_counter()
            run_job(pipe, job)
            elapsed_local = time.perf_counter() - started
            if i >= args.warmup:
                http_s.append(elapsed_http)
                local_s.append(elapsed_local)
    serve.shutdown()
    ray.shutdown()

    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"

    p50_http, p50_local = statistics.median(http_s), statistics.median(local_s)
    p95_http, p95_local = percentile(http_s, 95), percentile(local_s, 95)
    # What the Serve path added to each request: the pairs ran back to back, so their difference cancels most noise.
    added = [h - loc for h, loc in zip(http_s, local_s)]
    report = "\n".join([
        f"### Serve path overhead, {args.size}, {args.steps} steps, tiny model",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, {machine()}, "
        f"torch {torch.__version__} with {threads} threads on both sides, {args.requests} requests each "
        f"(after {args.warmup} warm-up), interleaved. Command: `python -m bench.serve_overhead`.",
        "",
        "| path | p50 ms | p95 ms |",
        "| --- | --- | --- |",
        f"| in-process `run_job` | {ms(p50_local)} | {ms(p95_local)} |",
        f"| HTTP -> Serve proxy -> Ingress -> Generator | {ms(p50_http)} | {ms(p95_http)} |",
        f"| added by the Serve path (per request pair) | {ms(statistics.median(added))} | "
        f"{ms(percentile(added, 95))} |",
        "",
        f"Ratio HTTP / in-process at p50: {p50_http / p50_local:.2f}. Target: under 30 ms added at p50 "
        f"({'met' if statistics.median(added) < 0.030 else 'NOT met'}).",
        "",
    ])
    publish(report, args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
