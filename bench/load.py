"""Load test on loopback: the simulated mixed fleet at several concurrency levels, bounded in count and time.

For each level: throughput, p50/p95/p99 latency, how many requests were turned away (503 + Retry-After once every
tier that could serve is full; the tiers' queues are kept short here, 4, so saturation shows), and lost requests
(anything that is neither a 200 with all its images nor a 503 with Retry-After: must be 0).

Memory: the levels run `--warmup-rounds` then `--rounds` times over. The private memory (RssAnon) of every Ray
process (each named by its role: raylet, GCS, a Serve replica, ...) is read at rest after every round (2 s after the
last response, the lowest of three reads a second apart: what a round's last request still holds for a moment is
not growth), and each process's trend over the measured rounds must stay under 5 %. A leak grows every round; a
warm-up (allocator arenas, caches and buffers filling) grows in the first rounds and then stays. The Ray processes
run as `zit up` starts them (runtime/local.py RAY_PROCESS_ENV: glibc's malloc with MALLOC_ARENA_MAX=2 instead of
Ray's preloaded jemalloc, results up to 10 MiB inline): with glibc's default arenas the threaded ones (raylets, the
proxy, the ingress) grew 5-20 % over the same run, with images through the object store the raylets swung by
megabytes from round to round, and under jemalloc the raylets grew about 0.1 MiB a minute, requests or not.
Set RAY_JEMALLOC_LIB_PATH to Ray's libjemalloc.so to measure Ray's default allocator instead.
`--idle-round-s S` is the baseline: the same cluster, application and rounds, each S seconds with no requests, so a
trend under load can be told from what Ray's processes grow on their own. Prints a Markdown table; with --write
appends it to docs/benchmarks.md.

  .venv/bin/python -m bench.load [--levels 2,8,32] [--requests 40] [--warmup-rounds 2] [--rounds 8]
                                 [--idle-round-s S] [--write]
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


def ray_rss_bytes() -> dict[int, tuple[str, int]]:
    """(role, RSS) of every Ray process on this machine (raylets, GCS, workers, replicas), by pid."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "memory_info"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        name = proc.info["name"] or ""
        if "ray::" in cmd or "raylet" in name or "gcs_server" in name:
            if proc.info["memory_info"]:
                role = cmd.split()[0] if cmd.startswith("ray::") else name
                out[proc.info["pid"]] = (role, proc.info["memory_info"].rss, _status_kib(proc.info["pid"]))
    return out


def ray_memory_at_rest(settle_s: float = 2.0, reads: int = 3, every_s: float = 1.0) -> dict[int, tuple[str, int]]:
    """`ray_rss_bytes` once the round's last responses have gone out: wait `settle_s`, read `reads` times `every_s`
    apart and keep each process's lowest private memory. A leak raises the resting level; what a round's last
    request still holds for a moment (an image being encoded, a response being sent) does not."""
    time.sleep(settle_s)
    reads_ = []
    for i in range(reads):
        if i:
            time.sleep(every_s)
        reads_.append(ray_rss_bytes())
    rest = {}
    for pid in set.intersection(*(set(r) for r in reads_)):
        rest[pid] = min((r[pid] for r in reads_), key=lambda v: v[2].get("RssAnon", v[1] >> 10))
    return rest


def _status_kib(pid: int) -> dict[str, int]:
    """RssAnon (the process's own heap), RssFile and RssShmem (shared memory it touched, e.g. the raylet's object
    store pages) from /proc, in KiB; empty where /proc has no such lines."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)
            if k in ("RssAnon", "RssFile", "RssShmem")}


def memory_growth(samples: list[dict[int, tuple[str, int]]], base: int = 0) -> list[dict]:
    """Per process alive in every sample: role, RSS at sample `base` and at the end, growth between them, and the
    RSS after each round (MiB)."""
    common = set.intersection(*(set(s) for s in samples))
    rows = []
    for pid in common:
        # Private memory (RssAnon): what a leak grows. RSS also counts pages of the program's files as they are first
        # executed and the object store's shared pages as they are first touched, both bounded and reclaimable.
        series = [s[pid][2].get("RssAnon", s[pid][1] >> 10) << 10 for s in samples]
        measured = series[base:]
        rows.append({"pid": pid, "role": samples[-1][pid][0], "first": series[base], "last": series[-1],
                     "growth": (series[-1] - series[base]) / series[base], "trend": trend(measured),
                     "mib": [round(v / 2**20, 1) for v in series]})
    return sorted(rows, key=lambda r: -r["trend"])


def trend(values: list[int]) -> float:
    """Growth across the series from its least-squares line (slope x length / mean): robust to the allocator's
    round-to-round swings, which make first-vs-last comparisons of small processes mostly noise."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum((i - mean_x) ** 2 for i in range(n))
    return slope * (n - 1) / mean_y


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
    parser.add_argument("--warmup-rounds", type=int, default=2, help="rounds before memory is measured")
    parser.add_argument("--rounds", type=int, default=8, help="rounds measured after the warm-up")
    parser.add_argument("--time-scale", default="0.1")
    parser.add_argument("--idle-round-s", type=float, default=None,
                        help="the idle baseline: the same cluster and rounds, each this long, with no requests")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig
    from runtime.local import RAY_PROCESS_ENV
    from runtime.simfleet import fleet_cluster

    rows = []
    with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": args.time_scale}) as (cards, port):
        from ray import serve

        tiers = [t.model_copy(update={"max_queued_requests": 4}) for t in tiers_for_cards(cards)]
        serve.run(build_app(ServiceConfig(tiers=tiers)), name="zit", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        levels = [int(x) for x in args.levels.split(",")]

        def one_round() -> list[dict]:
            """Every level's requests, one level after another; in the idle baseline, one wait of --idle-round-s
            with nothing sent (no results)."""
            if args.idle_round_s:
                time.sleep(args.idle_round_s)
                return []
            return [run_level(url, level, args.requests) for level in levels]

        # Warm-up rounds: every replica has run every size, queues have filled, allocators have grown.
        samples = []
        for round_ in range(args.warmup_rounds):
            one_round()
            samples.append(ray_memory_at_rest())
        base = len(samples) - 1  # growth is measured from the last warm-up round
        for round_ in range(args.rounds):
            for i, result in enumerate(one_round()):
                print(round_, result, flush=True)
                if round_ == 0:
                    rows.append(result)
                else:  # the latency table shows the first round; every round must lose nothing
                    rows[i]["lost"] += result["lost"]
            samples.append(ray_memory_at_rest())
            print(round_, [(r["role"], r["mib"], samples[-1][r["pid"]][2]) for r in memory_growth(samples, base)[:3]],
                  flush=True)
    procs = memory_growth(samples, base)
    total = sum(p["last"] for p in procs) / sum(p["first"] for p in procs) - 1
    worst = procs[0]
    command = (f"`python -m bench.load --levels {args.levels} --requests {args.requests} --warmup-rounds "
               f"{args.warmup_rounds} --rounds {args.rounds}"
               + (f" --idle-round-s {args.idle_round_s:g}`" if args.idle_round_s else "`"))
    when = f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}."
    if args.idle_round_s:
        lines = ["### Idle baseline on the simulated mixed fleet", "",
                 f"{when} The same cluster and application as the load runs, sent nothing: each round is "
                 f"{args.idle_round_s:g} s of waiting, then the same reading at rest. What grows here grows with "
                 f"time, not with requests. Command: {command}.", ""]
    else:
        lines = [
            "### Load on the simulated mixed fleet",
            "",
            f"{when} Fleet `cluster/fleets/mixed.yaml`, one Ray node per card, tier queues of 4; {args.requests} "
            f"requests of 512x512 (n 1-2, 4 steps) per level, simulated time scale {args.time_scale}. Command: "
            f"{command}.",
            "",
            "| concurrency | images/s | p50 s | p95 s | p99 s | ok | 503 + Retry-After | lost |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(f"| {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                         f"{r['p99']:.2f} | {r['ok']} | {r['rejected']} | {r['lost']} |")
        lines += ["", f"Latencies are from the first of {args.rounds} measured rounds (after {args.warmup_rounds} "
                      f"warm-up rounds); `lost` counts all measured rounds ({args.rounds * args.requests} requests per "
                      "level)."]
    warm = [f"warm-up {i + 1}" for i in range(args.warmup_rounds)]
    ray_env = "; ".join(f"{key}={os.environ.get(key, 'unset') or '(empty)'}" for key in RAY_PROCESS_ENV)
    lines += ["", f"Private memory (RssAnon) of the {len(procs)} Ray processes alive throughout, at rest after each round "
              f"({ray_env}; MiB; "
              f"the five with the steepest trend). `trend`: growth over the measured rounds along the least-squares "
              f"line; `first to last`: the two end points. All processes together: {total * 100:+.1f} %.", "",
              "| process | " + " | ".join(warm + [f"round {i + 1}" for i in range(args.rounds)])
              + " | trend | first to last |",
              "| --- | " + " | ".join(["---"] * (len(warm) + args.rounds)) + " | --- | --- |"]
    for p in procs[:5]:
        lines.append(f"| {p['role']} | " + " | ".join(f"{v:g}" for v in p["mib"])
                     + f" | {p['trend'] * 100:+.1f} % | {p['growth'] * 100:+.1f} % |")
    over = [p for p in procs if p["trend"] >= 0.05]
    lines += ["", f"Steepest trend: {worst['role']} {worst['trend'] * 100:+.1f} %. Target: every process under 5 % "
                  f"({'met' if not over else 'NOT met by ' + ', '.join(p['role'] for p in over)})"
                  + ("." if args.idle_round_s else f"; lost requests: {sum(r['lost'] for r in rows)} (target 0)."), ""]
    report = "\n".join(lines)
    publish(report, args.write, SECTION, INTRO)


if __name__ == "__main__":
    main()
