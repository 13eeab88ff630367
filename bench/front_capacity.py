"""CPU the front spends per image request: the Serve HTTP proxy and the Ingress replica, read from /proc.

One Ray cluster and one Serve instance (one proxy, `proxy_location: HeadOnly`, with the project's proxy middleware and
Ray process environment, runtime/local.py) run two applications on one CPU tier
of the tiny model: `before` (validate_responses: the response built as pydantic models and validated and written by
FastAPI, as the ingress did up to #23) at /before, and `after` (its JSON written once, schemas.image_generation_body)
at /. For each size and response format the two run in alternating rounds of `--requests` requests, `--concurrency`
at a time, so machine noise hits both alike; each round's CPU time (user + system, /proc/<pid>/stat) of the proxy
and of that application's ingress replica, less what the process spends at rest over the round's wall time, is
divided by the requests it served. The generator's own time (the tiny
model, PNG encoding) is in other processes and not counted. Prints a Markdown table; with --write appends it to
docs/benchmarks.md. Target (#23): ingress + proxy at most 15 ms per 1024x1024 b64_json image.

  .venv/bin/python -m bench.front_capacity [--requests 40] [--rounds 2] [--concurrency 8] [--write]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from bench.common import commit, machine, publish

SECTION = "Front capacity: ingress and proxy CPU per request (`bench/front_capacity.py`)"
INTRO = ("CPU milliseconds the Serve HTTP proxy and the Ingress replica spend per image request, before and after "
         "the ingress writes its JSON once (#23). Target: ingress + proxy at most 15 ms per 1024x1024 b64_json "
         "image; `url` less still.")
TARGET_MS = 15.0
CASES = [("64x64", "b64_json"), ("64x64", "url"), ("1024x1024", "b64_json"), ("1024x1024", "url")]
VARIANTS = {"before": "/before", "after": ""}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def front_pids() -> dict[str, int]:
    """The proxy's pid and each application's ingress replica's pid, by their Ray process titles."""
    import psutil

    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::ProxyActor"):
            pids["proxy"] = proc.info["pid"]
        for app in VARIANTS:
            if cmd.startswith(f"ray::ServeReplica:{app}:Ingress"):
                pids[app] = proc.info["pid"]
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per round, per variant and case")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant and case")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=20.0, help="seconds to measure each process at rest")
    parser.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    import httpx
    import ray
    from ray import serve

    from cluster.tiers import TierConfig
    from deployments.app import build_app
    from deployments.config import ServiceConfig
    from runtime.local import HEAD_RESOURCES, ensure_ray_process_env

    ensure_ray_process_env()  # as deployed: the proxy with its replay middleware (deployments/proxy.py)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, resources=HEAD_RESOURCES, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    for app, prefix in VARIANTS.items():
        config = ServiceConfig(tiers=[TierConfig(name="cpu", num_cpus=0.5)], validate_responses=(app == "before"))
        serve.run(build_app(config), name=app, route_prefix=prefix or "/")
    pids = front_pids()
    assert set(pids) == {"proxy", *VARIANTS}, f"front processes not found: {pids}"

    def post(client: httpx.Client, prefix: str, size: str, fmt: str, seed: int) -> int:
        body = {"prompt": "a red fox in the snow", "size": size, "steps": 1, "seed": seed, "response_format": fmt}
        response = client.post(f"{prefix}/v1/images/generations", json=body)
        assert response.status_code == 200, response.text[:300]
        return len(response.content)

    # cpu ms per request, by (case, variant, process); response bytes by case
    measured: dict[tuple, list[float]] = {}
    body_bytes: dict[tuple, int] = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client, \
            ThreadPoolExecutor(args.concurrency) as pool:
        for app, prefix in VARIANTS.items():  # warm-up: first calls, caches, the stage
            for size, fmt in CASES:
                post(client, prefix, size, fmt, 1)
        # What each process spends with no requests (Serve's control loops, metrics, the ingress's fleet poll),
        # per second: subtracted from every round for its wall time, so the rounds of slow (large) images are not
        # charged for waiting on the generator.
        idle_before, idle_started = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.perf_counter()
        time.sleep(args.idle_s)
        idle_rate = {name: (cpu_seconds(pid) - idle_before[name]) / (time.perf_counter() - idle_started)
                     for name, pid in pids.items()}
        for size, fmt in CASES:
            for round_ in range(args.rounds):
                for app, prefix in VARIANTS.items():
                    before, started = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.perf_counter()
                    sizes = list(pool.map(lambda i: post(client, prefix, size, fmt, 100 + i), range(args.requests)))
                    time.sleep(0.5)  # the last responses' bookkeeping
                    after, wall = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.perf_counter() - started
                    for name in ("proxy", app):
                        role = "proxy" if name == "proxy" else "ingress"
                        spent = after[name] - before[name] - idle_rate[name] * wall
                        measured.setdefault((size, fmt, app, role), []).append(1000 * spent / args.requests)
                    body_bytes[(size, fmt)] = int(statistics.median(sizes))
    serve.shutdown()
    ray.shutdown()

    def ms(size, fmt, app, role) -> float:
        return statistics.median(measured[(size, fmt, app, role)])

    lines = [
        "### Ingress and proxy CPU per request, tiny model, one CPU tier",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, {machine()}. {args.rounds} rounds of "
        f"{args.requests} requests per variant and case, {args.concurrency} at a time, variants alternating, 1 step; "
        f"median over rounds; each process's CPU at rest ({args.idle_s:.0f} s measured: proxy "
        f"{1000 * idle_rate['proxy']:.1f} ms/s, ingress {1000 * idle_rate['after']:.1f} ms/s) subtracted for each "
        f"round's wall time. Command: `python -m bench.front_capacity`.",
        "",
        "| request | response bytes | ingress ms, before | ingress ms, after | proxy ms, before | proxy ms, after | "
        "ingress + proxy ms, before | after | after / before |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    verdict = None
    for size, fmt in CASES:
        ib, ia = ms(size, fmt, "before", "ingress"), ms(size, fmt, "after", "ingress")
        pb, pa = ms(size, fmt, "before", "proxy"), ms(size, fmt, "after", "proxy")
        lines.append(f"| {size}, {fmt} | {body_bytes[(size, fmt)]:,} | {ib:.1f} | {ia:.1f} | {pb:.1f} | {pa:.1f} | "
                     f"{ib + pb:.1f} | {ia + pa:.1f} | {(ia + pa) / (ib + pb):.2f} |")
        if (size, fmt) == ("1024x1024", "b64_json"):
            verdict = ia + pa
    lines += ["", f"Target: ingress + proxy at most {TARGET_MS:.0f} ms per 1024x1024 b64_json image: "
                  f"{verdict:.1f} ms, {'met' if verdict <= TARGET_MS else 'NOT met'}.", ""]
    publish("\n".join(lines), args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
