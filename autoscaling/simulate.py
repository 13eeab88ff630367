"""A discrete-event simulation of a large fleet: the real routing and autoscaling code against simulated cards.

What is real and what is simulated:
- real: the tiers (`cluster.tiers.tiers_for_cards`), their profiles and memory plans (`deployments.routing`), the
  Dispatcher's chunking and tier choice under load (`Dispatcher.plan` / `Dispatcher.assign`, which call
  `scheduler.choose_chunk_tier` and `SpeedBook`), the in-tier router's ranking (`deployments.router.rank_replicas`)
  and the autoscaling policies (`autoscaling.policy`);
- simulated: the cards (memory from the fleet file, compute time from `cluster.speed.predict_seconds` at each card's
  speed and PCIe link; a card refuses a chunk whose predicted peak (`cluster.memory.predict_peak`) does not fit what it has left,
  which counts as an out-of-memory event), the clock (an event queue: arrivals, chunk ends, replicas becoming ready,
  control periods; no sleeping) and the workload (seeded `random.Random`: the same seed gives the same run).

One request: plan the tiers (memory model), cut it into chunks and choose each chunk's tier with the live loads
(Dispatcher.assign); a chunk waits in its tier's queue (bounded: beyond `max_queued_requests` the request is
rejected, as the service answers 503) until a ready replica whose card holds it is free (rank_replicas). When no
tier that fits has a ready replica, the chunk waits on the tier the policy is already starting (else the one
that fits
(fastest first), which is how a tier at zero replicas sees demand. The latency of a request is from arrival to its last
chunk's end.

A replica added by the policy is placed on a card of its tier with room for the profile's resident memory (most
room, then fastest first) and is ready `cold_start_s` later; a removed one finishes its chunk first. GPU time: a
card with a replica is busy while it computes and idle otherwise (loading included); a card without one is off.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field

from autoscaling.policy import POLICIES, PolicyConfig, TierSignals
from cluster.memory import load_calibration, predict_peak, resident_bytes
from cluster.nvml import BF16_MIN_CC, MIB, CardSpec, FleetFile, load_fleet_file
from cluster.profiles import tier_profile
from cluster.requests import work_units
from cluster.link import PCIE_BYTES_S, Link, link_of
from cluster.speed import predict_seconds, prior_units_per_s, reference_step_s
from cluster.stages import place_text_encoder, staged_tiers
from cluster.tiers import classify, tier_budget, tiers_for_cards
from deployments.dispatch import Dispatcher
from deployments.routing import NoTierFits
from deployments.scheduler import TierLoad, TiersFull

# How often the policy runs, simulated seconds. Ray Serve's controller decides every 0.1 s but replicas push their
# metrics every 10 s, so decisions change at most that often.
CONTROL_PERIOD_S = 10.0
# Model load time of a new replica: Z-Image-Turbo's 33 GB from local disk into host memory and onto the card.
COLD_START_S = 60.0
# Waiting chunks a tier takes per card before rejecting (the ingress's bounded queue, scaled with the fleet: 32
# per tier, TierConfig's default, is meant for a few cards per tier).
QUEUE_PER_CARD = 2
# CPU milliseconds the front spends per request, (fixed, per megapixel of images returned as b64_json), for the
# Ingress replica and the Serve HTTP proxy: bench/front_capacity.py, docs/benchmarks.md (2-core EPYC VM, 2026-12-03,
# the mean of two runs of the pure-ASGI middleware and the proxy's replay: 64x64 and 1024x1024, b64_json).
FRONT_CPU_MS = {"ingress": (13.2, 20.1), "proxy": (7.4, 5.9)}
# One front process is one Python interpreter: plan it to this share of one core, so it queues little.
FRONT_TARGET_UTILIZATION = 0.7
FRONT_WINDOW_S = 60.0


# -- fleet -------------------------------------------------------------------------------------------------------


@dataclass
class SimCard:
    index: int
    model: str
    tier: str | None
    memory_total: int
    capacity: int  # what a replica of ours can hold: total minus what foreign processes hold
    speed: float
    bf16: bool
    failed: bool
    link_bytes_s: float = PCIE_BYTES_S  # its PCIe link's host-to-device rate (cluster/link.py)


def scale_fleet(fleet: FleetFile, cards: int | None) -> list[CardSpec]:
    """The fleet's card kinds with counts scaled to `cards` in all (largest remainder), or as they are."""
    specs = list(fleet.cards)
    if cards is None:
        return specs
    total = sum(s.count for s in specs)
    exact = [s.count * cards / total for s in specs]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(specs)), key=lambda i: (counts[i] - exact[i], i))[: cards - sum(counts)]:
        counts[i] += 1
    return [s.model_copy(update={"count": c}) for s, c in zip(specs, counts) if c > 0]


def build_cards(specs: list[CardSpec]) -> list[SimCard]:
    cards = []
    for spec in specs:
        total = (spec.memory_total_mib or int(spec.vram_gb * 1024)) * MIB
        bf16 = spec.bf16 if spec.bf16 is not None else spec.cc >= BF16_MIN_CC
        for _ in range(spec.count):
            cards.append(SimCard(len(cards), spec.model, classify(total), total,
                                 total - (spec.foreign_memory_mib + spec.graphics_memory_mib) * MIB, spec.speed,
                                 bf16, spec.fail, link_of(spec.pcie).bytes_s))
    return cards


# -- workload ----------------------------------------------------------------------------------------------------


class WorkloadSpec(BaseModel):
    """A workload: either a trace (`requests`) or an arrival process with a size and n mix."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(1.0, gt=0, description="Mean arrivals per second (Poisson) before modulation.")
    diurnal_amplitude: float = Field(
        0.6, ge=0, lt=1, description="Rate swings by this fraction around the mean over one diurnal period.")
    diurnal_period_s: float | None = Field(
        None, gt=0, description="Length of one 'day' in seconds; default the run's duration (one day per run).")
    bursts_per_hour: float = Field(3.0, ge=0, description="Bursts (flash crowds) per hour, at random times.")
    burst_factor: float = Field(3.0, ge=1, description="Rate multiplier during a burst.")
    burst_s: float = Field(120.0, gt=0, description="Length of one burst in seconds.")
    sizes: dict[str, float] = Field(
        default_factory=lambda: {"512x512": 0.25, "768x768": 0.15, "1024x1024": 0.35, "1024x1536": 0.1,
                                 "1536x1536": 0.1, "2048x2048": 0.05},
        description="Image size 'WxH' -> weight.")
    n: dict[int, float] = Field(default_factory=lambda: {1: 0.45, 2: 0.2, 4: 0.25, 8: 0.1},
                                description="Images per request -> weight.")
    steps: int = Field(9, ge=1, le=50, description="Denoising steps of every request.")
    repeat_fraction: float = Field(0.3, ge=0, le=1, description="Share of requests whose prompt an earlier request "
                                   "had (the text-encoder stage's cache answers those).")
    requests: list[dict] | None = Field(
        None, description="A trace instead of the process: [{t, size: 'WxH', n, steps?}], t in seconds.")


@dataclass(frozen=True)
class Request:
    id: int
    t: float
    width: int
    height: int
    n: int
    steps: int
    prompt: int = -1  # which prompt (requests with the same number repeat it); -1: its own


def load_workload(path: str | Path) -> WorkloadSpec:
    return WorkloadSpec.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def generate_requests(spec: WorkloadSpec, duration_s: float, rng: random.Random) -> list[Request]:
    """Arrivals in [0, duration): the trace as given, or a Poisson process whose rate follows a diurnal sine
    (lowest at the start) and a few bursts, thinned from the peak rate (exact for a time-varying rate)."""
    def size(text: str) -> tuple[int, int]:
        w, h = text.lower().split("x")
        return int(w), int(h)

    if spec.requests is not None:
        out = []
        for i, r in enumerate(sorted(spec.requests, key=lambda r: r["t"])):
            if r["t"] < duration_s:
                w, h = size(r.get("size", "1024x1024"))
                out.append(Request(i, float(r["t"]), w, h, int(r.get("n", 1)), int(r.get("steps", spec.steps))))
        return out
    period = spec.diurnal_period_s or duration_s
    bursts = [rng.uniform(0, duration_s) for _ in range(_poisson(rng, spec.bursts_per_hour * duration_s / 3600))]

    def rate(t: float) -> float:
        r = spec.rate * (1 - spec.diurnal_amplitude * math.cos(2 * math.pi * t / period))
        return r * (spec.burst_factor if any(b <= t < b + spec.burst_s for b in bursts) else 1.0)

    peak = spec.rate * (1 + spec.diurnal_amplitude) * spec.burst_factor
    sizes, size_w = [size(s) for s in spec.sizes], list(spec.sizes.values())
    ns, n_w = list(spec.n), list(spec.n.values())
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() * peak <= rate(t):
            w, h = rng.choices(sizes, size_w)[0]
            prompt = out[rng.randrange(len(out))].prompt if out and rng.random() < spec.repeat_fraction else len(out)
            out.append(Request(len(out), t, w, h, rng.choices(ns, n_w)[0], spec.steps, prompt))


def _poisson(rng: random.Random, mean: float) -> int:
    k, p, limit = 0, 1.0, math.exp(-mean)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# -- the text-encoder stage --------------------------------------------------------------------------------------

# Prompts the simulated stage remembers (its cache): 256 MiB of real embeddings at about 0.3 MB each.
STAGE_CACHE_ENTRIES = 850


def _snapshot(card: SimCard):
    """A SimCard as the stage's placement reads cards (a GpuSnapshot's fields)."""
    from types import SimpleNamespace

    return SimpleNamespace(uuid=str(card.index), name=card.model, tier=card.tier, index=card.index, error=None,
                           slots=1, memory_total=card.memory_total, foreign_memory=card.memory_total - card.capacity,
                           bf16=card.bf16, speed=card.speed)


class StageQueue:
    """The text-encoder stage as the simulation runs it: one encode at a time per replica (one per hosting card),
    first come first served, each taking the time model's encode time on its card; a prompt its cache holds costs
    nothing; the cache keeps the `cache_entries` most recently used prompts."""

    def __init__(self, placement, cards: list[SimCard], cache_entries: int, cal):
        from collections import OrderedDict

        from cluster.speed import encode_seconds

        speeds = [c.speed for c in cards] or [CPU_STAGE_SPEED]  # 'cpu': no card, encode_seconds takes the CPU
        self.seconds = [encode_seconds(placement.profile, speed, cal) for speed in speeds]
        self.free_at = [0.0] * len(self.seconds)
        self.cache: OrderedDict = OrderedDict()
        self.cache_entries = cache_entries
        self.where = placement.where
        self.hits = self.misses = 0
        self.waited_s = 0.0

    def encode(self, r: Request, now: float) -> float | None:
        """When the request's embeddings are ready (None: at once, from the cache)."""
        if r.prompt >= 0 and r.prompt in self.cache:
            self.cache.move_to_end(r.prompt)
            self.hits += 1
            return None
        self.misses += 1
        replica = min(range(len(self.free_at)), key=lambda i: max(self.free_at[i], now))
        start = max(self.free_at[replica], now)
        self.free_at[replica] = start + self.seconds[replica]
        self.waited_s += start - now
        if r.prompt >= 0:
            self.cache[r.prompt] = True
            if len(self.cache) > self.cache_entries:
                self.cache.popitem(last=False)
        return self.free_at[replica]

    def report(self, requests: int) -> dict:
        total = self.hits + self.misses
        return {"where": self.where, "encodes_per_request": round(self.misses / max(1, requests), 3),
                "cache_hit_ratio": round(self.hits / total, 3) if total else None,
                "mean_wait_s": round(self.waited_s / max(1, self.misses), 3)}


# A 'cpu' stage's card speed for the time model: unused (encode_seconds takes CPU_FLOPS for a CPU profile).
CPU_STAGE_SPEED = 1.0


# -- the simulated service ---------------------------------------------------------------------------------------


@dataclass
class Chunk:
    request: "Pending"
    tier: str
    n: int
    units: float
    need: int  # predicted peak bytes


@dataclass
class Pending:
    request: Request
    chunks_left: int


@dataclass(eq=False)
class Replica:
    card: SimCard
    since: float
    ready: bool = False
    chunk: Chunk | None = None
    started: float = 0.0
    draining: bool = False

    @property
    def kind(self) -> tuple[int, float, float]:
        return self.card.capacity, self.card.speed, self.card.link_bytes_s


@dataclass
class Tier:
    name: str
    cards: list[SimCard]  # cards that can host a replica, best first
    resident: int
    queue_limit: int
    replicas: list[Replica] = field(default_factory=list)
    free: dict = field(default_factory=dict)  # card kind (capacity, speed) -> ready replicas without a chunk
    queue: deque = field(default_factory=deque)
    queued_units: float = 0.0
    running_units: float = 0.0
    busy: int = 0
    n_ready: int = 0  # ready replicas not draining
    last_work: float = 0.0
    # integrals over the current control period, and throughput totals
    area_t: float = 0.0
    busy_area: float = 0.0
    ready_area: float = 0.0
    units_done: float = 0.0
    busy_done_s: float = 0.0

    def live(self) -> int:
        return sum(1 for r in self.replicas if not r.draining)


class _Loads:
    """Adapter giving the Dispatcher a TierQueue-like `.load()` per tier from the simulated state."""

    def __init__(self, sim: "Simulation", tier: str):
        self.sim, self.tier = sim, tier

    def load(self, queue_limit: int, seconds_per_unit: float) -> TierLoad:
        t = self.sim.tiers[self.tier]
        return TierLoad(t.name, t.n_ready, t.busy, len(t.queue), t.queued_units + t.running_units, t.queue_limit,
                        seconds_per_unit)


class Simulation:
    def __init__(self, cards: list[SimCard], decide: Callable, config: PolicyConfig | None = None,
                 cold_start_s: float = COLD_START_S, control_period_s: float = CONTROL_PERIOD_S,
                 queue_per_card: int = QUEUE_PER_CARD, text_encoder: str = "auto",
                 cache_entries: int = STAGE_CACHE_ENTRIES):
        from deployments.router import rank_replicas

        self.rank_replicas = rank_replicas
        self.decide = decide
        self.cal = load_calibration()
        self.cold_start_s = cold_start_s
        self.period = control_period_s
        self.now = 0.0
        self.events: list = []
        self.order = itertools.count()
        self.policy_state: dict = {}
        # 1. Tiers from the cards (the same function `zit up` uses), with the profile each runs; the text-encoder
        #    stage placed as `zit up` places it (on the card with the most to spare: its memory leaves that card,
        #    and every tier runs without its own encoder), or in every generator ('local').
        usable = [c for c in cards if c.tier is not None]
        configs = [t.model_copy(update={"max_queued_requests": max(32, QUEUE_PER_CARD * t.num_replicas)})
                   for t in tiers_for_cards(usable)]
        self.stage = place_text_encoder([_snapshot(c) for c in usable if not c.failed], configs,
                                        {t.name: tier_profile(t) for t in configs}, text_encoder)
        configs = staged_tiers(configs, self.stage.where, list(self.stage.tiers), self.stage.reserve_bytes)
        for card in usable:
            if str(card.index) in self.stage.cards:
                card.capacity -= self.stage.reserve_bytes
        self.profiles = {t.name: tier_profile(t) for t in configs}
        self.encoder = StageQueue(self.stage, [c for c in usable if str(c.index) in self.stage.cards],
                                  cache_entries, self.cal) if self.stage.where != "local" else None
        config = config or PolicyConfig()
        self.config = PolicyConfig(**{**config.__dict__, "priors": tuple(
            (t.name, prior_units_per_s(t.name, t.speed, t.bf16)) for t in configs)}) if not config.priors else config
        self.tiers: dict[str, Tier] = {}
        for t in configs:
            resident = resident_bytes(self.profiles[t.name], self.cal)  # what a loaded replica holds
            hosts = sorted((c for c in usable if c.tier == t.name and not c.failed and c.capacity >= resident),
                           key=lambda c: (-c.capacity, -c.speed, c.index))
            self.tiers[t.name] = Tier(t.name, hosts, resident, max(32, queue_per_card * t.num_replicas))
        # 2. The Dispatcher, as the ingress builds it; its queues read the simulated state.
        self.dispatcher = Dispatcher(configs, self.profiles, {}, self.cal)
        for t in configs:  # the live budget: the largest card of the tier that can host a replica
            caps = [c.capacity for c in self.tiers[t.name].cards]
            if caps and t.vram_bytes is not None:
                self.dispatcher.budgets[t.name] = min(tier_budget(t), max(caps))
        self.dispatcher.queues = {name: _Loads(self, name) for name in self.tiers}
        self._plans: dict = {}
        self._peaks: dict = {}
        self._seconds: dict = {}
        # 3. Results.
        self.latencies: list[float] = []
        self.chunks_started = 0
        self.images = 0
        self.rejected = {"queue_full": 0, "no_tier_fits": 0}
        self.oom = 0
        self.busy_s = 0.0
        self.replica_s = 0.0
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.decisions: list[tuple[float, dict]] = []

    # -- events ----------------------------------------------------------------------------------------------------

    def _push(self, t: float, kind: str, payload=None) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, payload))

    def run(self, requests: list[Request], duration_s: float) -> dict:
        started = time.perf_counter()
        self._control(initial=True)
        for r in requests:
            self._push(r.t, "arrive", r)
        self._push(self.period, "control")
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if kind == "control" and t > duration_s and not self._busy():
                continue  # the last requests have finished: stop controlling
            self._advance(t)
            if kind == "arrive":
                self._arrive(payload)
            elif kind == "encoded":
                self._admit(payload)
            elif kind == "done":
                self._done(payload)
            elif kind == "ready":
                self._ready(*payload)
            elif kind == "control":
                self._control()
                self._push(t + self.period, "control")
        self._advance(self.now)
        for tier in self.tiers.values():  # replicas still up at the end
            for r in tier.replicas:
                self.replica_s += self.now - r.since
        return self.report(duration_s, time.perf_counter() - started, len(requests))

    def _busy(self) -> bool:
        return any(t.busy or t.queue for t in self.tiers.values())

    def _advance(self, t: float) -> None:
        """Move the clock, integrating busy and ready replica time per tier for the busy fraction."""
        dt = t - self.now
        if dt > 0:
            for tier in self.tiers.values():
                tier.busy_area += tier.busy * dt
                tier.ready_area += tier.n_ready * dt
        self.now = t

    # -- requests --------------------------------------------------------------------------------------------------

    def _plan(self, r: Request):
        key = (r.width, r.height, r.steps, r.n)
        if key not in self._plans:
            try:
                self._plans[key] = self.dispatcher.plan(r.width, r.height, r.steps, r.n)
            except NoTierFits:
                self._plans[key] = None
        return self._plans[key]

    def _peak(self, tier: str, r: Request, n: int) -> int:
        key = (tier, r.width, r.height, n)
        if key not in self._peaks:
            self._peaks[key] = predict_peak(r.width, r.height, n, self.profiles[tier], self.cal).total
        return self._peaks[key]

    def _arrive(self, r: Request) -> None:
        """A request arrives: the text-encoder stage first (a cache hit passes at once), then its chunks."""
        if self.encoder is None:
            self._admit(r)
            return
        done_at = self.encoder.encode(r, self.now)
        if done_at is None:  # a cache hit
            self._admit(r)
        else:
            self._push(done_at, "encoded", r)

    def _admit(self, r: Request) -> None:
        fitting = self._plan(r)
        if fitting is None:
            self.rejected["no_tier_fits"] += 1
            return
        try:
            chunks = self.dispatcher.assign(fitting, r.width, r.height, r.steps, r.n, 0)
        except TiersFull:
            chunks = self._cold_assign(fitting, r)
            if chunks is None:
                self.rejected["queue_full"] += 1
                return
        pending = Pending(r, len(chunks))
        for tier, seeds in chunks:
            n = len(seeds)
            self._enqueue(Chunk(pending, tier, n, work_units(r.width, r.height, n, r.steps), self._peak(tier, r, n)))
        for tier in dict.fromkeys(t for t, _ in chunks):
            self._dispatch(self.tiers[tier])

    def _cold_assign(self, fitting, r: Request):
        """No fitting tier has a ready replica (or every one is full): wait on the fastest tier that is starting, else
        on the fastest that fits and has cards. None when a tier with ready replicas is full (a real rejection)."""
        if any(self.tiers[p.tier].n_ready for p in fitting):
            return None
        candidates = [p for p in fitting if self.tiers[p.tier].cards]
        starting = [p for p in candidates if self.tiers[p.tier].replicas]
        # The tier that will finish it first once loaded: the time model at the tier's slowest card.
        plan = min(starting or candidates, default=None,
                   key=lambda p: predict_seconds(r.width, r.height, 1, r.steps, self.profiles[p.tier],
                                                 self.dispatcher.tiers[p.tier].speed or 1.0, self.cal).total_s)
        if plan is None or len(self.tiers[plan.tier].queue) >= self.tiers[plan.tier].queue_limit:
            return None
        size = max(plan.chunks)
        return [(plan.tier, list(range(i, min(r.n, i + size)))) for i in range(0, r.n, size)]

    def _enqueue(self, chunk: Chunk) -> None:
        tier = self.tiers[chunk.tier]
        tier.queue.append(chunk)
        tier.queued_units += chunk.units
        tier.last_work = self.now

    def _dispatch(self, tier: Tier) -> None:
        """Start waiting chunks on free ready replicas, first come first served (a chunk no free card holds lets the
        next one go first), each on the replica the in-tier router ranks first among those whose card holds it."""
        i = 0
        while i < len(tier.queue) and any(tier.free.values()):
            chunk = tier.queue[i]
            replica = self._route(tier, chunk)
            if replica is None:
                i += 1
                continue
            del tier.queue[i]
            tier.queued_units -= chunk.units
            self._start(tier, replica, chunk)

    def _route(self, tier: Tier, chunk: Chunk) -> Replica | None:
        """rank_replicas over one representative per card kind (free replicas of a kind are interchangeable)."""
        from deployments.router import ReplicaView

        kinds = [kind for kind, free in tier.free.items() if free]
        views = [ReplicaView(str(i), capacity, reference_step_s=reference_step_s(self.profiles[tier.name], speed,
                                                                                 Link(link, "pcie")))
                 for i, (capacity, speed, link) in enumerate(kinds)]
        ranked = self.rank_replicas(views, chunk.need)
        return tier.free[kinds[int(ranked[0][0])]].pop() if ranked else None

    def _seconds_for(self, card: SimCard, chunk: Chunk) -> float:
        r = chunk.request.request
        key = (chunk.tier, card.speed, card.link_bytes_s, r.width, r.height, chunk.n, r.steps)
        if key not in self._seconds:
            self._seconds[key] = predict_seconds(r.width, r.height, chunk.n, r.steps, self.profiles[chunk.tier],
                                                 card.speed, self.cal, link=Link(card.link_bytes_s, "pcie")).total_s
        return self._seconds[key]

    def _start(self, tier: Tier, replica: Replica, chunk: Chunk) -> None:
        if chunk.need > replica.card.capacity:  # the simulated card refuses it, as CUDA would
            self.oom += 1
            chunk.request.chunks_left = -1
            return
        replica.chunk, replica.started = chunk, self.now
        self.chunks_started += 1  # with every generator encoding its own chunks, each one encodes the prompt
        tier.running_units += chunk.units
        tier.busy += 1
        tier.last_work = self.now
        self._push(self.now + self._seconds_for(replica.card, chunk), "done", (tier.name, replica))

    def _done(self, payload) -> None:
        name, replica = payload
        tier = self.tiers[name]
        chunk = replica.chunk
        seconds = self.now - replica.started
        replica.chunk = None
        tier.running_units -= chunk.units
        tier.busy -= 1
        tier.last_work = self.now
        tier.units_done += chunk.units
        tier.busy_done_s += seconds
        self.busy_s += seconds
        r = chunk.request.request
        predicted = self._seconds_for_tier(chunk)
        self.dispatcher.speed.record(name, seconds, predicted)
        pending = chunk.request
        if pending.chunks_left > 0:
            pending.chunks_left -= 1
            self.images += chunk.n
            if pending.chunks_left == 0:
                self.latencies.append(self.now - r.t)
        if replica.draining:
            self._remove(tier, replica)
        else:
            tier.free.setdefault(replica.kind, []).append(replica)
        self._dispatch(tier)

    def _seconds_for_tier(self, chunk: Chunk) -> float:
        """What the Dispatcher predicts for this chunk: the time model at the tier's slowest card."""
        r = chunk.request.request
        speed = self.dispatcher.tiers[chunk.tier].speed or 1.0
        key = (chunk.tier, speed, r.width, r.height, chunk.n, r.steps)
        if key not in self._seconds:
            self._seconds[key] = predict_seconds(r.width, r.height, chunk.n, r.steps, self.profiles[chunk.tier],
                                                 speed, self.cal).total_s
        return self._seconds[key]

    # -- autoscaling -----------------------------------------------------------------------------------------------

    def signals(self) -> list[TierSignals]:
        out = []
        for tier in self.tiers.values():
            span = self.now - tier.area_t
            busy = tier.busy_area / tier.ready_area if tier.ready_area > 0 else (1.0 if tier.busy else 0.0)
            has_work = tier.busy or tier.queue
            out.append(TierSignals(
                tier=tier.name, replicas=tier.live(), cards=len(tier.cards),
                running=tier.busy, queued=len(tier.queue), queued_units=tier.queued_units,
                busy_fraction=min(1.0, busy) if span > 0 or tier.busy else 0.0,
                units_per_s=tier.units_done / tier.busy_done_s if tier.busy_done_s > 0 else None,
                idle_s=0.0 if has_work else self.now - tier.last_work, cold_start_s=self.cold_start_s,
            ))
            tier.area_t, tier.busy_area, tier.ready_area = self.now, 0.0, 0.0
        return out

    def _control(self, initial: bool = False) -> None:
        replicas, state = self.decide(self.signals(), self.config, self.now, self.policy_state)
        self.policy_state = state
        self.decisions.append((self.now, {k: {x: y for x, y in v.items() if not x.startswith("_")}
                                          for k, v in state.items()}))
        for name, want in replicas.items():
            self._scale(self.tiers[name], want, ready_now=initial)
        for name, info in state.items():  # cold start: re-route what waits on a loading tier to a warm one
            if info.get("send_to") and not initial:
                self._reroute(self.tiers[name])
        self.timeline.append((self.now, {name: t.live() for name, t in self.tiers.items()}))

    def _scale(self, tier: Tier, want: int, ready_now: bool = False) -> None:
        live = [r for r in tier.replicas if not r.draining]
        if want > len(live):
            used = {r.card.index for r in tier.replicas}
            for card in [c for c in tier.cards if c.index not in used][: want - len(live)]:
                replica = Replica(card, self.now)
                tier.replicas.append(replica)
                if ready_now:
                    self._ready(tier.name, replica)
                else:
                    self._push(self.now + self.cold_start_s, "ready", (tier.name, replica))
        elif want < len(live):
            # Remove loading replicas first, then idle ones (slowest card first), then busy ones after their chunk.
            order = sorted(live, key=lambda r: (r.ready, r.chunk is not None, r.card.speed))
            for r in order[: len(live) - want]:
                if r.ready:
                    tier.n_ready -= 1
                if r.chunk is None:
                    if r.ready:
                        tier.free[r.kind].remove(r)
                    self._remove(tier, r)
                else:
                    r.draining = True

    def _ready(self, name: str, replica: Replica) -> None:
        tier = self.tiers[name]
        if replica not in tier.replicas:
            return  # removed while it was loading
        replica.ready = True
        tier.n_ready += 1
        tier.free.setdefault(replica.kind, []).append(replica)
        self._dispatch(tier)

    def _remove(self, tier: Tier, replica: Replica) -> None:
        tier.replicas.remove(replica)
        self.replica_s += self.now - replica.since

    def _reroute(self, tier: Tier) -> None:
        """Send the chunks waiting on `tier` back through the Dispatcher's tier choice (warm tiers first)."""
        waiting, tier.queue, tier.queued_units = list(tier.queue), deque(), 0.0
        for chunk in waiting:
            r = chunk.request.request
            fitting = [p for p in (self._plan(r) or []) if chunk.n <= max(p.chunks)]
            try:
                target = self.dispatcher.assign(fitting, r.width, r.height, r.steps, chunk.n, 0)[0][0]
            except TiersFull:
                target = tier.name
            if target != tier.name:
                chunk = Chunk(chunk.request, target, chunk.n, chunk.units, self._peak(target, r, chunk.n))
            self._enqueue(chunk)
            self._dispatch(self.tiers[target])

    # -- results ---------------------------------------------------------------------------------------------------

    def report(self, duration_s: float, wall_s: float, requests: int) -> dict:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, max(0, round(q / 100 * (len(lat) - 1))))], 2) if lat else None

        cards = sum(len(t.cards) for t in self.tiers.values())
        span_h = self.now / 3600
        return {
            "requests": requests,
            "completed": len(lat),
            "images": self.images,
            "images_per_s": round(self.images / duration_s, 3),
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "mean_s": round(statistics.fmean(lat), 2) if lat else None,
            "rejected": dict(self.rejected),
            "rejections": sum(self.rejected.values()),
            "out_of_memory": self.oom,
            "gpu_hours": {
                "busy": round(self.busy_s / 3600, 2),
                "idle": round((self.replica_s - self.busy_s) / 3600, 2),
                "off": round(max(0.0, cards * span_h - self.replica_s / 3600), 2),
            },
            "text_encoder": self.encoder.report(requests) if self.encoder is not None else {
                "where": "local", "encodes_per_request": round(self.chunks_started / max(1, requests), 3)},
            "simulated_s": round(self.now, 1),
            "wall_s": round(wall_s, 2),
            "replicas_over_time": [[round(t, 1), reps] for t, reps in self.timeline],
        }


# -- the front ---------------------------------------------------------------------------------------------------


def front_load(requests: list[Request], duration_s: float, window_s: float = FRONT_WINDOW_S) -> dict:
    """What the front (Serve's HTTP proxies and the Ingress replicas) needs for these requests, by FRONT_CPU_MS:
    the mean CPU per request, the busiest `window_s`'s CPU cores, and how many ingress replicas and proxies keep
    each under FRONT_TARGET_UTILIZATION of a core. Every request counts, refused ones too (they are answered)."""
    out = {}
    for role, (fixed_ms, per_mpix_ms) in FRONT_CPU_MS.items():
        windows: dict[int, float] = {}
        total = 0.0
        for r in requests:
            ms = fixed_ms + per_mpix_ms * r.width * r.height * r.n / 1e6
            total += ms
            slot = int(r.t // window_s)
            windows[slot] = windows.get(slot, 0.0) + ms
        peak_cores = max(windows.values(), default=0.0) / 1000 / window_s
        out[role] = {"ms_per_request": round(total / max(1, len(requests)), 1),
                     "mean_cores": round(total / 1000 / max(duration_s, 1e-9), 3),
                     "peak_cores": round(peak_cores, 3),
                     "processes_needed": max(1, math.ceil(peak_cores / FRONT_TARGET_UTILIZATION - 1e-9))}
    return out


def front_line(front: dict, images_per_s: float) -> str:
    """One sentence on the front: its peak load and the ingress replicas and proxies that carry it."""
    ingress, proxy = front["ingress"], front["proxy"]
    return (f"Front (bench/front_capacity.py figures): {ingress['ms_per_request']} ms of ingress and "
            f"{proxy['ms_per_request']} ms of proxy CPU per request; busiest minute {ingress['peak_cores']} ingress "
            f"and {proxy['peak_cores']} proxy cores: {ingress['processes_needed']} ingress replica(s) and "
            f"{proxy['processes_needed']} proxy node(s) at {FRONT_TARGET_UTILIZATION:.0%} of a core "
            f"({images_per_s:.2f} images/s served by the cards)")


# -- entry points ------------------------------------------------------------------------------------------------


def simulate(fleet: str | Path | FleetFile, policies: list[str], duration_s: float, workload: WorkloadSpec,
             cards: int | None = None, seed: int = 0, config: PolicyConfig | None = None,
             cold_start_s: float = COLD_START_S, text_encoder: str = "auto") -> dict[str, dict]:
    """Run each policy on the same fleet and the same requests; one report per policy."""
    fleet = fleet if isinstance(fleet, FleetFile) else load_fleet_file(fleet)
    sim_cards = build_cards(scale_fleet(fleet, cards))
    requests = generate_requests(workload, duration_s, random.Random(seed))
    out = {}
    for name in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)} or 'all'")
        sim = Simulation([*map(_copy_card, sim_cards)], POLICIES[name], config, cold_start_s,
                         text_encoder=text_encoder)
        out[name] = sim.run(requests, duration_s)
        out[name]["cards"] = len(sim_cards)
        out[name]["front"] = front_load(requests, duration_s)
    return out


def _copy_card(card: SimCard) -> SimCard:
    return SimCard(**card.__dict__)


def plot(results: dict[str, dict], path: str | Path) -> str:
    """Replicas per tier over time, one panel per policy: a PNG with matplotlib, else a self-contained SVG/HTML."""
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_html(results, path.with_suffix(".html"))
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), sharex=True, squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items()):
        timeline = res["replicas_over_time"]
        tiers = list(timeline[0][1]) if timeline else []
        xs = [t / 60 for t, _ in timeline]
        ax.stackplot(xs, *[[reps[t] for _, reps in timeline] for t in tiers], labels=tiers, step="post")
        gh = res["gpu_hours"]
        ax.set_title(f"{name}: {res['images_per_s']} images/s, p95 {res['p95_s']} s, idle {gh['idle']} GPU-h, "
                     f"{res['rejections']} rejected, {res['out_of_memory']} OOM", fontsize=9)
        ax.set_ylabel("replicas")
        ax.legend(loc="upper left", fontsize=7, ncol=len(tiers))
    axes[-1, 0].set_xlabel("simulated minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_html(results: dict[str, dict], path: Path) -> str:
    colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"]
    parts = ["<!doctype html><meta charset=utf-8><title>zit simulate</title><body style='font-family:sans-serif'>"]
    for name, res in results.items():
        timeline = res["replicas_over_time"]
        if not timeline:
            continue
        tiers = list(timeline[0][1])
        end = timeline[-1][0] or 1
        top = max(sum(reps.values()) for _, reps in timeline) or 1
        parts.append(f"<h3>{name}: p95 {res['p95_s']} s, idle {res['gpu_hours']['idle']} GPU-h</h3>"
                     "<svg width=800 height=200 viewBox='0 0 800 200'>")
        for (t0, reps), (t1, _) in zip(timeline, timeline[1:]):
            base = 0
            for i, tier in enumerate(tiers):
                h = reps[tier] / top * 190
                parts.append(f"<rect x={t0 / end * 800:.1f} y={200 - base - h:.1f} width={(t1 - t0) / end * 800 + 0.5:.1f} "
                             f"height={h:.1f} fill='{colors[i % len(colors)]}'><title>{tier}</title></rect>")
                base += h
        parts.append("</svg>")
    path.write_text("".join(parts))
    return str(path)


COLUMNS = ("images/s", "p50 s", "p95 s", "p99 s", "busy GPU-h", "idle GPU-h", "off GPU-h", "rejected", "OOM")


def row(name: str, r: dict) -> list[str]:
    gh = r["gpu_hours"]
    return [name, f"{r['images_per_s']:.2f}", str(r["p50_s"]), str(r["p95_s"]), str(r["p99_s"]), f"{gh['busy']:.1f}",
            f"{gh['idle']:.1f}", f"{gh['off']:.1f}", str(r["rejections"]), str(r["out_of_memory"])]


def table(results: dict[str, dict]) -> str:
    """A Markdown table, one row per policy."""
    lines = ["| policy | " + " | ".join(COLUMNS) + " |", "| --- " * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + " | ".join(row(name, r)) + " |" for name, r in results.items()]
    return "\n".join(lines)
