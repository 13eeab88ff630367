"""Faults under load on the simulated mixed fleet: replica processes and a card node's raylet killed with SIGKILL.

One multi-node Ray cluster (a node per simulated card of cluster/fleets/mixed.yaml, runtime.simfleet.fleet_cluster).
A steady mixed load (sizes 512-1024, n 1-2, `concurrency` at a time) runs twice: once without faults (each
request's expected time), then with them: the Generator processes of two tiers are killed (a crashing driver), then,
while the RTX 3070's replica runs a chunk, the raylet of that card's node (a host losing the card, or its power).
The 3070 is the only card of its tier, so its chunks must move to other tiers (reason node_lost).

What counts (the fault test in tests/system/test_faults.py asserts it): every request ends 200 with its images, or
503 with Retry-After; none waits longer than twice its expected time plus the detection delay (Ray's own, from the
kill to the node reported dead, plus the 10 s the service may take after that); the service serves afterwards and
GET /v1/fleet shows the lost card. Prints a Markdown report; with --write appends it to docs/benchmarks.md.

  .venv/bin/python -m bench.faults [--requests 36] [--concurrency 6] [--rounds 1] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import commit, machine, percentile, publish

FLEET = Path(__file__).resolve().parents[1] / "cluster" / "fleets" / "mixed.yaml"
SIZES = (512, 640, 768, 896, 1024)
NS = (1, 1, 2)
STEPS = 3
# Simulated cards take the time model's seconds times this: a 1024x1024 chunk on the 3070 takes about half a second,
# long enough for the raylet to be killed under a running chunk.
TIME_SCALE = "0.05"
# The tiers whose replica processes are killed, and the card whose node's raylet is: the only vram_8 card.
KILLED_REPLICA_TIERS = ("vram_6", "vram_12")
LOST_TIER = "vram_8"
# After Ray reports a node dead, the service must have moved its chunks within this (the target).
AFTER_DETECTION_S = 10.0


def workload(count: int, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"faults {i}", "size": f"{side}x{side}", "n": rng.choice(NS), "seed": 1000 + 10 * i,
             "steps": STEPS} for i, side in enumerate(rng.choice(SIZES) for _ in range(count))]


@dataclass
class Answer:
    body: dict
    status: int
    seconds: float
    retry_after: str | None = None
    images: int = 0
    retries: list[dict] = field(default_factory=list)
    error: str = ""


@dataclass
class FaultRun:
    baseline: list[Answer]
    answers: list[Answer]
    killed_pids: dict[str, int]
    raylet_killed_at: float | None = None  # seconds after the fault round began
    node_dead_after_s: float | None = None  # from the raylet kill to Ray reporting the node dead
    lost_after_s: float | None = None  # from the raylet kill to /v1/fleet showing the tier lost
    after: Answer | None = None  # a request once the faults are over
    fleet_after: dict = field(default_factory=dict)
    watch_errors: list[str] = field(default_factory=list)  # GET /v1/fleet or Ray's node table failing meanwhile

    def expected_s(self, answer: Answer) -> float:
        """What a request of this workload takes without faults: the slowest of the fault-free round. With
        `concurrency` requests in flight on five cards, a request's time is mostly the queue ahead of it, not its
        own size, so the whole round's slowest is the honest expectation for each (its own size's slowest would
        charge the queue to the fault)."""
        return max(b.seconds for b in self.baseline)

    @property
    def detection_delay_s(self) -> float:
        return (self.node_dead_after_s or 0.0) + AFTER_DETECTION_S

    def too_slow(self) -> list[Answer]:
        return [a for a in self.answers if a.seconds > 2 * self.expected_s(a) + self.detection_delay_s]

    def bad(self) -> list[Answer]:
        """Answers that are neither 200 with every image nor 503 with Retry-After."""
        return [a for a in self.answers
                if not ((a.status == 200 and a.images == a.body["n"]) or (a.status == 503 and a.retry_after))]


def send(url: str, body: dict) -> Answer:
    import httpx

    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=900)
    except httpx.HTTPError as exc:
        return Answer(body, 0, time.perf_counter() - started, error=repr(exc))
    answer = Answer(body, response.status_code, time.perf_counter() - started,
                    retry_after=response.headers.get("retry-after"))
    if response.status_code == 200:
        payload = response.json()
        answer.images = len(payload["data"])
        answer.retries = payload["metadata"]["retries"]
    else:
        answer.error = response.text[:300]
    return answer


def fleet(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/fleet", timeout=30).json()


def run_load(url: str, requests: list[dict], concurrency: int) -> list[Answer]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda body: send(url, body), requests))


def kill_replicas(url: str, tiers: tuple[str, ...]) -> dict[str, int]:
    """SIGKILL the Generator process of each tier in `tiers` (as a crashing driver does); their pids by tier."""
    killed = {}
    for replica in fleet(url)["replicas"]:
        if replica["tier"] in tiers and replica["tier"] not in killed:
            os.kill(replica["pid"], signal.SIGKILL)
            killed[replica["tier"]] = replica["pid"]
    return killed


def node_alive(card_uuid: str) -> bool:
    from deployments.registry import card_nodes
    from runtime.nodes import LABEL_CARD

    return any(n["alive"] for n in card_nodes() if n["labels"].get(LABEL_CARD) == card_uuid)


def wait_until_serving(url: str, replicas: int, timeout_s: float = 120) -> None:
    """Until every replica has reported to the fleet registry (the ingress routes on those reports)."""
    deadline = time.monotonic() + timeout_s
    while len(fleet(url)["replicas"]) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {replicas} replicas reported after {timeout_s:.0f} s")
        time.sleep(1)


def run_faults(url: str, cards, kill_raylet, requests: int = 36, concurrency: int = 6,
               say=lambda line: None) -> FaultRun:
    """The whole scenario on a deployed service (module docstring). `kill_raylet(card_uuid)` SIGKILLs the raylet of
    that card's node (runtime.simfleet.kill_card_raylet on an in-process fleet)."""
    work = workload(requests)
    say(f"baseline: {len(work)} requests, {concurrency} at a time, no faults")
    baseline = run_load(url, work, concurrency)
    victim = next(card for card in cards if card.tier == LOST_TIER)
    run = FaultRun(baseline, [], {})
    began = time.perf_counter()

    def faults():
        try:
            inject_and_watch()
        except Exception as exc:  # the test says what broke, instead of a thread dying in silence
            run.watch_errors.append(f"fault thread: {exc!r}")

    def inject_and_watch():
        time.sleep(2.0)
        run.killed_pids.update(kill_replicas(url, KILLED_REPLICA_TIERS))
        say(f"killed the replica processes of {', '.join(run.killed_pids)}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for a chunk on the 3070, then pull its node from under it
            card = next((c for c in fleet(url)["cards"] if c["uuid"] == victim.uuid), {})
            if card.get("busy"):
                break
            time.sleep(0.1)
        kill_raylet(victim.uuid)
        killed = time.perf_counter()
        run.raylet_killed_at = killed - began
        say(f"killed the raylet of {victim.name}'s node at {run.raylet_killed_at:.1f} s")
        while run.node_dead_after_s is None or run.lost_after_s is None:
            try:
                if run.node_dead_after_s is None and not node_alive(victim.uuid):
                    run.node_dead_after_s = time.perf_counter() - killed
                if run.lost_after_s is None:
                    tiers = {t["name"]: t for t in fleet(url)["tiers"]}
                    if tiers[LOST_TIER].get("lost"):
                        run.lost_after_s = time.perf_counter() - killed
            except Exception as exc:
                run.watch_errors.append(f"{time.perf_counter() - killed:.1f} s after the kill: {exc!r}")
            if time.perf_counter() - killed > 300:
                break
            time.sleep(0.2)

    thread = threading.Thread(target=faults, daemon=True)
    thread.start()
    say("fault round: the same requests, replicas and a card node killed under them")
    run.answers = run_load(url, work, concurrency)
    thread.join(timeout=360)
    run.after = send(url, {"prompt": "after the faults", "size": "512x512", "n": 2, "seed": 5, "steps": STEPS})
    run.fleet_after = fleet(url)
    return run


def report(runs: list[FaultRun], requests: int, concurrency: int) -> str:
    lines = [
        f"Commit {commit()}, {time.strftime('%Y-%m-%d')}, {machine()}. Simulated mixed fleet "
        f"({FLEET.relative_to(FLEET.parents[2])}), ZIT_SIM_TIME_SCALE {TIME_SCALE}; {requests} requests "
        f"(512-1024 px, n 1-2, {STEPS} steps), {concurrency} at a time; per round: the replica processes of "
        f"{' and '.join(KILLED_REPLICA_TIERS)} killed (SIGKILL), then the raylet of the {LOST_TIER} card's node "
        "(SIGKILL) while it ran a chunk.",
        "",
        "| round | 200 | 503 + Retry-After | other | retries (reason: count) | worst latency s (its bound) "
        "| node reported dead after kill s | tier lost after kill s | after: 200 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, run in enumerate(runs, 1):
        reasons: dict[str, int] = {}
        for answer in run.answers:
            for retry in answer.retries:
                reasons[retry["reason"]] = reasons.get(retry["reason"], 0) + 1
        worst = max(run.answers, key=lambda a: a.seconds / (2 * run.expected_s(a) + run.detection_delay_s))
        bound = 2 * run.expected_s(worst) + run.detection_delay_s
        lines.append(
            f"| {i} | {sum(a.status == 200 for a in run.answers)} | "
            f"{sum(a.status == 503 and bool(a.retry_after) for a in run.answers)} | {len(run.bad())} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(reasons.items())) or '-'} | "
            f"{worst.seconds:.1f} ({bound:.1f}) | {run.node_dead_after_s or float('nan'):.1f} | "
            f"{run.lost_after_s or float('nan'):.1f} | {'yes' if run.after and run.after.status == 200 else 'NO'} |")
    lines += ["", "Slowest requests against their bound (2 x the slowest request without faults + Ray's detection "
                  "+ 10 s):", "",
              "| round | size | n | seconds | bound | retries |", "| --- | --- | --- | --- | --- | --- |"]
    for i, run in enumerate(runs, 1):
        ranked = sorted(run.answers, key=lambda a: a.seconds / (2 * run.expected_s(a) + run.detection_delay_s))
        for a in ranked[-3:][::-1]:
            moves = ", ".join(f"{r['reason']} {r['from']}->{r['to']}" for r in a.retries) or "-"
            lines.append(f"| {i} | {a.body['size']} | {a.body['n']} | {a.seconds:.1f} | "
                         f"{2 * run.expected_s(a) + run.detection_delay_s:.1f} | {moves} |")
    latencies = [a.seconds for run in runs for a in run.answers]
    base = [a.seconds for run in runs for a in run.baseline]
    lines += ["", f"Latency without faults p50 {percentile(base, 50):.2f} s, p95 {percentile(base, 95):.2f} s; "
                  f"with them p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="fault rounds, each on a fresh cluster")
    parser.add_argument("--write", action="store_true", help="append the report to docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray import serve

    from cluster.tiers import tiers_for_cards
    from deployments.app import build_app
    from deployments.config import ServiceConfig, TextEncoderSettings
    from runtime.simfleet import active_stage, fleet_cluster, kill_card_raylet

    runs = []
    for i in range(args.rounds):
        with fleet_cluster(FLEET, {"ZIT_SIM_TIME_SCALE": TIME_SCALE}) as (cards, port):
            config = ServiceConfig(tiers=tiers_for_cards(cards),
                                   text_encoder=TextEncoderSettings().resolve(active_stage()))
            serve.run(build_app(config), name="zit", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(url, len(cards))
            runs.append(run_faults(url, cards, kill_card_raylet, args.requests, args.concurrency,
                                   say=lambda line, i=i: print(f"[round {i + 1}] {line}", flush=True)))
    publish(report(runs, args.requests, args.concurrency), args.write, "Faults under load",
            "Replica processes and a card node's raylet killed under a steady load (bench/faults.py): what "
            "clients got, what moved, how long the worst request waited against its bound.")


if __name__ == "__main__":
    main()
