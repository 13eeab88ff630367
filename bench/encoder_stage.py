"""The text-encoder stage vs an encoder in every generator, on the simulated mixed fleet, side by side in one run.

One multi-node Ray cluster (a node per simulated card of cluster/fleets/mixed.yaml); the stage placed where `zit up`
places it (the RTX 4090, group-offloaded). The same workload is sent to the service deployed with the stage and
without it (`text_encoder: local`), alternating rounds so drift hits both. Requests are split over several cards
(n 4-8 at 768-1024 px, so chunks land on several tiers) and 30 % of them repeat an earlier prompt. Simulated cards
and the stage take the time model's seconds x ZIT_SIM_TIME_SCALE, encoder streaming over PCIe included: a generator
with its own offloaded encoder pays it for every chunk, the stage once per new prompt.

Reports encoder calls per request (stage: 1 on a miss, 0 on a cache hit, from each response's metadata; local:
one per chunk the generators ran, retries included) and p50/p95 latency. Targets: at most 1 call per request with
the stage, 0 on a hit. Prints a Markdown report; with --write appends it to docs/benchmarks.md.

  .venv/bin/python -m bench.encoder_stage [--requests 40] [--concurrency 4] [--rounds 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import commit, machine, percentile, publish

FLEET = Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "mixed.yaml"
SIZES = (768, 896, 1024)
NS = (4, 6, 8)
STEPS = 3
REPEAT = 0.3
TIME_SCALE = "0.2"


def workload(count: int, seed: int = 5) -> list[dict]:
    """`count` requests; each repeats an earlier one's prompt with probability REPEAT."""
    rng = random.Random(seed)
    prompts: list[str] = []
    out = []
    for i in range(count):
        if prompts and rng.random() < REPEAT:
            prompt = rng.choice(prompts)
        else:
            prompt = f"a lighthouse on a cliff, study {i}"
            prompts.append(prompt)
        side = rng.choice(SIZES)
        out.append({"prompt": prompt, "size": f"{side}x{side}", "n": rng.choice(NS), "seed": 100 + i,
                    "steps": STEPS})
    return out


def run(url: str, requests: list[dict], concurrency: int) -> dict:
    import httpx

    def one(body):
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=900)
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, requests))
    ok = [(r.json()["metadata"], t) for r, t in answers if r.status_code == 200]
    calls, tiers_per_request = [], []
    for meta, _ in ok:
        stage = meta.get("text_encoder")
        attempts = len(meta["chunks"]) + len(meta["retries"])  # every chunk run, and every run that failed
        calls.append((0 if stage["cached"] else 1) if stage else attempts)
        tiers_per_request.append(len({c["tier"] for c in meta["chunks"]}))
    latencies = [t for _, t in ok]
    return {"ok": len(ok), "failed": len(answers) - len(ok), "calls": calls, "latencies": latencies,
            "tiers": tiers_per_request}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray import serve

    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig, TextEncoderSettings
    from runtime.simfleet import active_stage, fleet_cluster

    requests = workload(args.requests)
    totals = {mode: {"ok": 0, "failed": 0, "calls": [], "latencies": [], "tiers": []} for mode in ("stage", "local")}
    with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": TIME_SCALE}) as (cards, port):
        url = f"http://127.0.0.1:{port}"
        placement = active_stage()
        configs = {"stage": TextEncoderSettings().resolve(placement),
                   "local": TextEncoderSettings(placement="local", where="local")}
        for round_ in range(args.rounds):
            for mode in ("stage", "local") if round_ % 2 == 0 else ("local", "stage"):
                config = ServiceConfig(tiers=tiers_for_cards(cards), text_encoder=configs[mode])
                serve.run(build_app(config), name="zit", route_prefix="/")
                run(url, requests[:2], 2)  # warm-up: the first step times measured, the stage's cache cold again
                result = run(url, requests, args.concurrency)
                print(mode, round_, {k: v if isinstance(v, int) else len(v) for k, v in result.items()}, flush=True)
                for key in ("ok", "failed"):
                    totals[mode][key] += result[key]
                for key in ("calls", "latencies", "tiers"):
                    totals[mode][key] += result[key]

    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, commit {commit()}, {machine()}. Fleet "
        "`cluster/fleets/mixed.yaml`, one Ray node per card; the stage where `zit up` places it: "
        f"{placement.reason}. {args.requests} requests (n {', '.join(map(str, NS))} at "
        f"{', '.join(map(str, SIZES))} px, {STEPS} steps, {REPEAT:.0%} repeating an earlier prompt), {args.concurrency} "
        f"at a time, {args.rounds} rounds per mode alternating; simulated time scale {TIME_SCALE} (PCIe streaming of "
        "the encoder included). Command: `python -m bench.encoder_stage`.",
        "",
        "| text encoder | requests ok | failed | tiers per request (mean) | encoder calls per request (mean, max) "
        "| calls on repeated prompts | p50 s | p95 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    repeated = {i for i, r in enumerate(requests) if any(r["prompt"] == q["prompt"] for q in requests[:i])}
    for mode, label in (("stage", "stage (one per request, cached)"), ("local", "in every generator (today)")):
        t = totals[mode]
        calls = t["calls"]
        # Calls of the requests whose prompt came before (the order of answers is the order of `requests`).
        rep = [c for i, c in enumerate(calls) if i % len(requests) in repeated]
        lines.append(f"| {label} | {t['ok']} | {t['failed']} | {sum(t['tiers']) / max(1, len(t['tiers'])):.2f} | "
                     f"{sum(calls) / max(1, len(calls)):.2f}, {max(calls, default=0)} | "
                     f"{sum(rep) / max(1, len(rep)):.2f} | {percentile(t['latencies'], 50):.2f} | "
                     f"{percentile(t['latencies'], 95):.2f} |")
    stage_calls = totals["stage"]["calls"]
    lines += ["", f"With the stage: at most {max(stage_calls, default=0)} encoder call per request (target: at most "
                  f"1, 0 on a cache hit: {'met' if max(stage_calls, default=0) <= 1 else 'NOT met'})."]
    publish("\n".join(lines), args.write, "The text-encoder stage (`bench/encoder_stage.py`)",
            "Encoder calls per request and latency with the text-encoder stage vs an encoder in every generator, on "
            "the same workload, side by side.")


if __name__ == "__main__":
    main()
