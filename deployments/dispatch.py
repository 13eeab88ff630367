"""From an admitted request to finished chunks: tier choice under load, bounded queues, retries elsewhere.

For one request: 1. plan every tier for this size (memory model; a request with guidance_scale > 0 as guided, since
classifier-free guidance doubles the transformer's batch): which can hold an image and how many per call;
2. cut the n images into chunks, choosing a tier for each with the live loads (`scheduler.choose_chunk_tier`);
3. run the chunks in parallel, each through its tier's bounded queue and the tier's VRAM-aware router;
4. retry a failed chunk where it can succeed: out of memory (after the replica's own degraded retry) on a larger
   tier, NaN/black images on a tier with bf16, a dead replica on the same tier or another, at most MAX_ATTEMPTS
   times; every retry is listed in the response. Results come back in seed order.
5. a tier that no chunk can reach any more (`lost_tiers`: its card nodes died, and no replica of it runs anywhere)
   hands its waiting and running chunks to the next tier that holds them, at their place in the queue
   (reason `node_lost`; such a move does not count as an attempt: the chunk failed nowhere), and gets no new chunks
   until a replica or a card node of it is back. A request that only lost tiers could hold gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from cluster.memory import for_prompt, predict_peak, uses_cfg
from cluster.requests import GenerationJob, GenerationResult, work_units
from cluster.stages import STAGE
from cluster.speed import predict_seconds, reference_step_s
from cluster.tiers import tier_budget, tier_link
from deployments.config import COLD_START_OVERHEAD_S
from deployments.errors import ChunkBadImage, ChunkOutOfMemory
from deployments.metrics import ServiceMetrics
from deployments.routing import NoTierFits, fitting_plans, no_tier_fits, tier_plans
from deployments.scheduler import SpeedBook, TierQueue, TiersFull, choose_chunk_tier
from deployments.schemas import ImageGenerationRequest
from runtime.nodes import LABEL_CARD, LABEL_POD, LABEL_TEXT_ENCODER, LABEL_TIER

logger = logging.getLogger("ray.serve")

# Attempts per chunk, the first included: one retry for a transient fault and one more after moving tier.
MAX_ATTEMPTS = 3
# Attempts of the text-encoder stage per request: a replica that dies is replaced by Serve, and one more try covers
# an unlucky second death.
ENCODE_ATTEMPTS = 3
# What a client is told to wait when the only tiers that hold its request are lost: long enough for a pod to be
# replaced or a card node to rejoin, short enough that a client retrying finds the tier soon after it is back.
LOST_TIER_RETRY_AFTER_S = 30.0


class ChunkExhausted(RuntimeError):
    """A chunk failed on every tier it could go to; the message says where and why."""


class TierLost(RuntimeError):
    """The chunk's tier was lost while the chunk waited or ran there (`lost_tiers`); it moves to another tier."""

    def __init__(self, tier: str, why: str):
        self.tier = tier
        super().__init__(f"tier {tier} lost: {why}")


def lost_tiers(tiers, reports: list[dict], nodes: list[dict], retired=()) -> dict[str, str]:
    """The card tiers no chunk can reach now, each with why. Pure: the registry's replica reports (`node_id`,
    `tier`), Ray's card nodes (`alive`, `node_id` and the node's labels, deployments.registry.card_nodes) and the
    cards whose replica Serve stopped on purpose (FleetRegistry.retired_cards).

    A tier is lost when no replica of it reports from a live node, none of its card nodes is alive (so Serve has
    nowhere to start one), and at least one of them is missing: a card whose replica was scaled away on purpose and
    whose Kubernetes pod KubeRay then removed is not (waking the tier brings a pod back), a bare-metal card node that
    died is, whatever ran on it; a tier Ray has never seen a node of is not lost either. A card node that joins
    again, or a replica that reports, ends the loss."""
    dead = {node["node_id"] for node in nodes if not node["alive"]}
    live = {report.get("tier") for report in reports if report.get("node_id") not in dead}
    retired = set(retired)

    def removed_on_purpose(node: dict) -> bool:
        return node["labels"].get(LABEL_POD) == "true" and node["labels"].get(LABEL_CARD) in retired

    lost = {}
    for tier in tiers:
        if tier.device != "cuda" or tier.name in live:
            continue
        own = [node for node in nodes if node["labels"].get(LABEL_TIER) == tier.name]
        if not own or any(node["alive"] for node in own):
            continue
        crashed = sorted(node["labels"].get(LABEL_CARD, node["node_id"]) for node in own
                         if not removed_on_purpose(node))
        if crashed:
            lost[tier.name] = (f"the node of every card of the tier is dead (Ray reports card(s) {', '.join(crashed)} "
                               "dead) and no replica of it runs; back when a card node of the tier joins again")
    return lost


@dataclass
class Retry:
    seeds: list[int]
    reason: str
    from_tier: str
    to_tier: str

    def as_dict(self) -> dict:
        return {"seeds": self.seeds, "reason": self.reason, "from": self.from_tier, "to": self.to_tier}


@dataclass
class Outcome:
    results: list[GenerationResult]
    retries: list[Retry] = field(default_factory=list)
    encode: dict | None = None  # the text-encoder stage's answer for the request (None: the generators encoded)


def stage_lost(settings, reports: list[dict], nodes: list[dict]) -> str | None:
    """Why the text-encoder stage cannot answer now, or None: it runs on cards (`settings.where` 'card'), none of
    its replicas reports from a live node, and every card node that offers its resource is dead. Pure, as
    `lost_tiers`: the stage's own reports and Ray's card nodes."""
    if settings.where != "card" or reports:
        return None
    hosts = [node for node in nodes if node["labels"].get(LABEL_TEXT_ENCODER) == "true"]
    if not hosts or any(node["alive"] for node in hosts):
        return None
    return (f"the node of every card that hosts it is dead ({', '.join(sorted(n['labels'].get(LABEL_CARD, '?') for n in hosts))}); "
            "back when one joins again")


class Dispatcher:
    def __init__(self, tiers, profiles, generators, calibration, policy: str = "tier_aware",
                 metrics: ServiceMetrics | None = None, autoscaling=None, encoder=None,
                 encoder_wait_s: float = 120.0):
        self.policy = policy
        self.max_attempts = MAX_ATTEMPTS if policy == "tier_aware" else 1
        self._rotation = 0
        self.tiers = {t.name: t for t in tiers}
        self.order = [t.name for t in tiers]
        self.profiles = profiles
        self.generators = generators
        self.calibration = calibration
        # Autoscaled tiers (autoscaling/serve_policy.py) may be at zero replicas: work that waits for one wakes it.
        self.autoscaling = autoscaling
        arrivals = itertools.count()  # one order of arrival over every tier's queue
        self.queues = {t.name: TierQueue(t.name, t.num_replicas, t.max_queued_requests,
                                         scalable=autoscaling is not None and t.num_replicas > 0,
                                         cold_start_s=autoscaling.cold_start_s if autoscaling else 60.0,
                                         arrivals=arrivals)
                       for t in tiers}
        self.arrivals = arrivals
        self._wakes: dict[str, asyncio.Future] = {}
        # The text-encoder stage's handle (None: every generator encodes its own chunks), how long a request waits
        # for it, and why it cannot answer now (its card nodes are dead), if so.
        self.encoder = encoder
        self.encoder_wait_s = encoder_wait_s
        self.encoder_lost: str | None = None
        # Lost tiers (`lost_tiers`) and, per tier, the event that tells its waiting and running chunks to move.
        self.lost: dict[str, str] = {}
        self._lost_events = {t.name: asyncio.Event() for t in tiers}
        self.speed = SpeedBook()
        # Per tier: its replicas' throughput-weighted reference step over its slowest card's (`_predicted_seconds`).
        self.step_factor: dict[str, float] = {}
        self.budgets = {t.name: tier_budget(t) for t in tiers}
        self.drained: dict[str, bool] = {}
        self._reported: set[str] = set()  # tiers whose replicas have reported at least once
        self.metrics = metrics or ServiceMetrics(tiers)
        self.metrics.fleet.watch_queues(self.queues, autoscaling.min_replicas if autoscaling else 0,
                                        lost=lambda: self.lost)

    # -- live state from the replicas' reports -----------------------------------------------------------------

    def update_from_reports(self, replicas: list[dict]) -> None:
        """Replica counts and memory budgets per tier from the fleet registry (called every few seconds)."""
        live: dict[str, list[dict]] = {}
        for report in replicas:
            live.setdefault(report.get("tier"), []).append(report)
        for name, tier in self.tiers.items():
            reports = live.get(name, [])
            if tier.device == "cuda":  # a replica whose card fails NVML reads is drained: nothing new goes there
                healthy = [r for r in reports if r.get("card") and not r["card"].get("error")]
                self.drained[name] = bool(reports) and not healthy
                reports = healthy if reports else reports
            if reports:
                self._reported.add(name)
            # Until a tier's replicas first report, it keeps its configured count (they are loading); after that the
            # reports count: a tier whose replicas all went silent (a dead node, replicas restarting) takes no new
            # chunks until one reports again.
            if reports or self.drained.get(name) or self.autoscaling is not None or name in self._reported:
                self.queues[name].set_replicas(len(reports))
            loads = [r["load_seconds"] for r in reports if r.get("load_seconds")]
            queue = self.queues[name]
            if loads and queue.scalable:  # a cold start takes what loading took (plus Ray's start)
                queue.cold_start_s = max(loads) + COLD_START_OVERHEAD_S
            if queue.scalable and queue.replicas == 0 and queue.waiting and name not in self.lost:
                # Work waits for a tier the registry shows at zero: (again) wake it. If it has replicas the
                # registry has not heard of yet, the call returns at once and opens the queue.
                self._wake(name, queue.waiting, queue.waiting_units)
            steps = [r["reference_step_s"] for r in reports if r.get("reference_step_s")]
            if steps and tier.device == "cuda":
                # n replicas with reference steps s_i serve as fast as n of 1 / mean(1 / s_i) each (the in-tier
                # router sends a slow card work only when the fast ones are queued up).
                slowest = reference_step_s(self.profiles[name], tier.speed, tier_link(tier))
                self.step_factor[name] = len(steps) / sum(1 / s for s in steps) / slowest
            capacities = [r["card"]["memory_total"] - r["card"].get("foreign_memory", 0)
                          for r in reports if r.get("card") and "memory_total" in r["card"]]
            if capacities and tier.vram_bytes is not None:
                # A chunk needs one card that holds it; the router sends it only to such a card.
                self.budgets[name] = min(tier.vram_bytes, max(capacities))

    def update_lost(self, lost: dict[str, str]) -> None:
        """Which tiers are lost now (`lost_tiers`, called every few seconds). A tier that becomes lost sends its
        waiting and running chunks elsewhere at once; one that is back takes chunks again."""
        for name in self.tiers:
            if name in lost and name not in self.lost:
                logger.warning("tier %s is lost (%s); its chunks move to other tiers", name, lost[name])
                self._lost_events[name].set()
            elif name in self.lost and name not in lost:
                logger.info("tier %s is back", name)
                self._lost_events[name] = asyncio.Event()
        self.lost = {name: why for name, why in lost.items() if name in self.tiers}

    # -- one request ---------------------------------------------------------------------------------------------

    def unavailable(self) -> dict[str, str]:
        """Tiers that take no new chunk now, with why: lost, or drained (every card fails NVML reads)."""
        drained = {tier: "every card of this tier fails NVML reads (drained)" for tier, on in self.drained.items() if on}
        return {**drained, **self.lost}

    def plan(self, width: int, height: int, steps: int, n: int, cfg: bool = False, cal=None):
        """Tiers that can hold one image of this size now (guided when `cfg`), cheapest first, with their chunks.
        NoTierFits if none would, even with every tier up; TiersFull (503 + Retry-After) if only tiers that are
        unavailable now (lost or drained) would. `cal`: the request's calibration (`_calibration_for`)."""
        cal = cal or self.calibration
        unavailable = self.unavailable()
        try:
            return fitting_plans(list(self.tiers.values()), self.profiles, width, height, steps, n, cal,
                                 self.budgets, unavailable, cfg)
        except NoTierFits:
            holding = [p.tier for p in tier_plans(list(self.tiers.values()), self.profiles, width, height, steps, n,
                                                  cal, self.budgets, cfg)
                       if p.fits and p.tier in unavailable]
            if not holding:
                raise
            raise TiersFull(LOST_TIER_RETRY_AFTER_S, holding,
                            "the only tiers that hold this request are unavailable now ("
                            + "; ".join(f"{tier}: {unavailable[tier]}" for tier in holding) + ")") from None

    def _predicted_seconds(self, tier: str, width: int, height: int, n: int, steps: int, cal=None,
                           cfg: bool = False) -> float:
        """The time model's seconds for a chunk on `tier`: at its slowest card's speed and link, scaled by how much
        faster its replicas' own cards are (`step_factor`: the replicas' throughput-weighted reference step over
        the slowest card's, from their reports; 1 before they report)."""
        tier_config = self.tiers[tier]
        return predict_seconds(width, height, n, steps, self.profiles[tier], tier_config.speed or 1.0,
                               cal or self.calibration, cfg, tier_link(tier_config)).total_s \
            * self.step_factor.get(tier, 1.0)

    def _seconds_per_unit(self, tier: str, width: int, height: int, steps: int, cfg: bool = False,
                          cal=None) -> float:
        predicted = self._predicted_seconds(tier, width, height, 1, steps, cal, cfg)
        return predicted / work_units(width, height, 1, steps, cfg) * self.speed.correction(tier)

    def assign(self, fitting, width: int, height: int, steps: int, n: int, first_seed: int,
               cfg: bool = False, cal=None) -> list[tuple[str, list[int]]]:
        """Cut n images into chunks and choose each chunk's tier with the loads as they would be. TiersFull if none."""
        batch = {p.tier: max(p.chunks) for p in fitting}
        loads = {
            p.tier: self.queues[p.tier].load(self.tiers[p.tier].max_queued_requests,
                                             self._seconds_per_unit(p.tier, width, height, steps, cfg, cal))
            for p in fitting
        }
        chunks, seed, remaining = [], first_seed, n
        while remaining:
            candidates = [(loads[p.tier], work_units(width, height, min(remaining, batch[p.tier]), steps, cfg))
                          for p in fitting]
            load = choose_chunk_tier(candidates)
            size = min(remaining, batch[load.tier])
            chunks.append((load.tier, list(range(seed, seed + size))))
            if load.idle:
                load.running += 1
            else:
                load.waiting += 1
            load.backlog_units += work_units(width, height, size, steps, cfg)
            seed += size
            remaining -= size
        return chunks

    def assign_baseline(self, width: int, height: int, steps: int, n: int, first_seed: int, cfg: bool = False,
                        cal=None):
        """The baselines: `largest` sends every chunk to the largest tier (sized by the memory model there);
        `round_robin` rotates chunks over all tiers, as many images per call as the profile allows, without asking
        the memory model whether they fit."""
        names = [name for name in self.order if self.tiers[name].num_replicas > 0]
        chunks, seed, remaining = [], first_seed, n
        while remaining:
            if self.policy == "largest":
                plan = self.plan(width, height, steps, n, cfg, cal)[-1]
                if plan.tier != names[-1]:
                    raise no_tier_fits([plan], width, height, steps, cal or self.calibration, cfg)
                tier, size = plan.tier, min(remaining, max(plan.chunks))
            else:
                tier = names[self._rotation % len(names)]
                self._rotation += 1
                size = min(remaining, self.profiles[tier].max_n)
            chunks.append((tier, list(range(seed, seed + size))))
            seed += size
            remaining -= size
        return chunks, [p for p in tier_plans(list(self.tiers.values()), self.profiles, width, height, steps, n,
                                              cal or self.calibration, self.budgets, cfg) if p.fits]

    def _calibration_for(self, encoded):
        """The calibration to plan a request with: the transformer's prompt tokens are the request's real ones once
        the text-encoder stage has encoded it (cluster.memory.for_prompt), else the bound every prompt is padded
        to (the generators encode their own chunks: the count is not known before the chunk runs)."""
        return for_prompt(self.calibration, encoded.embeddings.transformer_tokens if encoded is not None else None)

    async def run(self, body: ImageGenerationRequest, width: int, height: int, first_seed: int) -> Outcome:
        cfg = uses_cfg(body.guidance_scale)  # guided: planned, sized and predicted as the pipeline will run it
        outcome = Outcome([])
        encoded = None
        if self.encoder is not None:  # once for the whole request: every chunk, tier and retry takes these
            # First, so the request is planned with its real prompt tokens. A request no tier holds even at the
            # fewest tokens, or that every tier's queue would refuse now, is refused before and costs no encode
            # (the stage encodes one prompt at a time: refused requests must not delay the served ones).
            if self.policy == "tier_aware":
                fewest = for_prompt(self.calibration, 0)
                self.assign(self.plan(width, height, body.steps, body.n, cfg, fewest), width, height, body.steps,
                            body.n, first_seed, cfg, fewest)  # the queues' loads are read, not changed
            encoded, attempts = await self._encode(body, cfg)
            outcome.encode = {"replica": encoded.replica, "cached": encoded.cached, "attempts": attempts,
                              "seconds": round(encoded.seconds, 4), "tokens": encoded.embeddings.tokens}
        cal = self._calibration_for(encoded)
        if self.policy == "tier_aware":
            fitting = self.plan(width, height, body.steps, body.n, cfg, cal)
            chunks = self.assign(fitting, width, height, body.steps, body.n, first_seed, cfg, cal)
        else:
            chunks, fitting = self.assign_baseline(width, height, body.steps, body.n, first_seed, cfg, cal)
        self.metrics.fitting_tiers(plan.tier for plan in fitting)
        parts = await gather_or_cancel(*(self._chunk(body, width, height, tier, seeds, fitting, outcome,
                                                     encoded=encoded) for tier, seeds in chunks))
        outcome.results = [result for part in parts for result in part]
        self.metrics.served(outcome.results)
        return outcome

    async def _encode(self, body: ImageGenerationRequest, cfg: bool):
        """(the request's embeddings from the text-encoder stage (deployments/encoder.py), the calls it took),
        retried when its replica dies (Serve starts another); TiersFull (503 + Retry-After) when the stage is lost or
        does not answer within `encoder_wait_s`, ChunkExhausted when it fails ENCODE_ATTEMPTS times."""
        from ray.exceptions import RayActorError

        for attempt in range(1, ENCODE_ATTEMPTS + 1):
            if self.encoder_lost:
                self.metrics.encoded(None, "lost")
                raise TiersFull(LOST_TIER_RETRY_AFTER_S, [STAGE], f"the text-encoder stage is unavailable now "
                                                                  f"({self.encoder_lost})")
            try:
                call = asyncio.ensure_future(self.encoder.encode.remote(body.prompt, body.negative_prompt, cfg))
                encoded = await asyncio.wait_for(call, timeout=self.encoder_wait_s)
            except RayActorError as exc:
                self.metrics.encoded(None, "replica_died")
                logger.warning("text-encoder stage replica died (attempt %d): %s", attempt, str(exc).splitlines()[0])
                continue
            except asyncio.TimeoutError:
                self.metrics.encoded(None, "timeout")
                raise TiersFull(LOST_TIER_RETRY_AFTER_S, [STAGE], f"the text-encoder stage did not answer within "
                                                                  f"{self.encoder_wait_s:.0f} s") from None
            self.metrics.encoded(encoded, "hit" if encoded.cached else "miss")
            return encoded, attempt
        raise ChunkExhausted(f"the text-encoder stage failed {ENCODE_ATTEMPTS} times for this request")

    def _wake(self, tier: str, queued: int, queued_units: float) -> None:
        """Work waits for a tier at zero replicas: call it (Serve holds the call until a replica runs, and counts
        it as demand, so the tier's autoscaler starts one). One wake-up in flight per tier."""
        if tier in self._wakes:
            return
        future = asyncio.ensure_future(self._wake_call(tier, queued, queued_units))
        self._wakes[tier] = future
        future.add_done_callback(lambda f, tier=tier: _wake_done(tier, self._wakes, f))

    async def _wake_call(self, tier: str, queued: int, queued_units: float) -> None:
        await self.generators[tier].wake.remote(queued, queued_units)
        queue = self.queues[tier]
        if queue.replicas == 0:  # a replica answered: the chunks can go before its first registry report
            queue.set_replicas(1)

    # -- one chunk, with retries ---------------------------------------------------------------------------------

    async def _chunk(self, body, width, height, tier, seeds, fitting, outcome, attempt=1, tried=(),
                     arrival=None, encoded=None) -> list:
        tried = (*tried, tier)
        if arrival is None:  # the chunk's place in line, kept wherever it moves
            arrival = next(self.arrivals)
        try:
            return [await self._attempt(body, width, height, tier, seeds, arrival, encoded)]
        except Exception as exc:
            reason = _failure_reason(exc)
            self.metrics.chunk_failed(tier, reason)
            if reason is None:
                raise
            counts = reason != "node_lost"  # the chunk failed nowhere: its tier went away under it
            if counts and attempt >= self.max_attempts:
                raise ChunkExhausted(f"seeds {seeds[0]}..{seeds[-1]} failed {attempt} times, last on {tier}: "
                                     f"{reason} ({str(exc).splitlines()[0][:300]})") from exc
            target = self._fallback(reason, tier, fitting, tried)
            if target is None:
                raise ChunkExhausted(f"seeds {seeds[0]}..{seeds[-1]} failed on {tier} ({reason}) and no other tier "
                                     f"can take them: {str(exc).splitlines()[0][:300]}") from exc
            logger.warning("chunk %s failed on %s (%s); retrying on %s", seeds, tier, reason, target.tier)
            outcome.retries.append(Retry(list(seeds), reason, tier, target.tier))
            self.metrics.retried(reason, tier, target.tier)
            # The new tier may hold fewer images per call: cut the chunk to its batch, keep the seeds in order.
            size = max(target.chunks)
            parts = [seeds[i:i + size] for i in range(0, len(seeds), size)]
            done = await gather_or_cancel(*(self._chunk(body, width, height, target.tier, part, fitting, outcome,
                                                        attempt + counts, tried, arrival, encoded) for part in parts))
            return [result for part in done for result in part]

    def _fallback(self, reason: str, tier: str, fitting, tried):
        """Where a failed chunk goes next: a larger tier after out-of-memory, a bf16 tier after black images, any
        tier that can hold it (its own first) after a replica died, the next tier that holds it after its tier was
        lost. Never a tier that is unavailable now (lost or drained)."""
        budget = self.budgets[tier]
        unavailable = self.unavailable()
        fitting = [plan for plan in fitting if plan.tier not in unavailable]
        if reason in ("replica_died", "node_lost"):  # Serve replaces a dead replica where its card still is
            own = [plan for plan in fitting if plan.tier == tier and reason == "replica_died"]
            others = [plan for plan in fitting if plan.tier not in tried]
            return (own or others or [None])[0]
        for plan in fitting:
            if plan.tier in tried:
                continue
            if reason == "out_of_memory" and self.budgets[plan.tier] > budget:
                return plan
            if reason == "bad_image" and self.tiers[plan.tier].bf16:
                return plan
        return None

    async def _attempt(self, body, width, height, tier, seeds, arrival=None, encoded=None) -> GenerationResult:
        """Run the chunk on `tier`, unless the tier is lost before it has finished there: then TierLost, at once,
        whether the chunk waited in the tier's queue or ran (its handle call is cancelled)."""
        if tier in self.lost:
            raise TierLost(tier, self.lost[tier])
        work = asyncio.ensure_future(self._run_on(body, width, height, tier, seeds, arrival, encoded))
        lost = asyncio.ensure_future(self._lost_events[tier].wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            lost.cancel()
        if work.done():
            return work.result()
        work.cancel()
        try:
            await work
        except BaseException:  # cancelled, or failed as it was cancelled: the tier is gone either way
            pass
        raise TierLost(tier, self.lost.get(tier, "its card nodes are dead"))

    async def _run_on(self, body, width, height, tier, seeds, arrival=None, encoded=None) -> GenerationResult:
        n = len(seeds)
        cfg = uses_cfg(body.guidance_scale)
        units = work_units(width, height, n, body.steps, cfg)
        profile = self.profiles[tier]
        cal = self._calibration_for(encoded)
        job = GenerationJob(
            prompt=body.prompt, negative_prompt=body.negative_prompt,
            encoded=encoded.embeddings if encoded is not None else None, width=width, height=height, steps=body.steps,
            guidance_scale=body.guidance_scale, seeds=list(seeds), output_format=body.output_format,
            quality=body.output_compression,
            predicted_peak=predict_peak(width, height, n, profile, cal, cfg).total,
            request_id=body.request_id, lora=body.lora, lora_scale=body.lora_scale,
        )
        queue = self.queues[tier]
        arrived = time.perf_counter()
        if queue.scalable and queue.replicas == 0:
            self._wake(tier, queue.waiting + 1, queue.waiting_units + units)
        await queue.acquire(body.priority, units, arrival)
        # What still waits for this tier travels with the job: the replica reports it to the autoscaler.
        job.tier_queue = (queue.waiting, queue.waiting_units)
        try:
            started = time.perf_counter()
            self.metrics.queue_waited(tier, started - arrived)
            handle = self.generators[tier]
            if body.lora:  # Serve model multiplexing: replicas that hold the adapter are preferred
                handle = handle.options(multiplexed_model_id=body.lora)
            result = await handle.generate.remote(job)
            predicted = self._predicted_seconds(tier, width, height, n, body.steps, cal, cfg)
            self.speed.record(tier, time.perf_counter() - started, predicted)
            self.metrics.chunk_done(tier, result, time.perf_counter() - started)
            return result
        finally:
            queue.release(units)


def _wake_done(tier: str, wakes: dict, future: asyncio.Future) -> None:
    if wakes.get(tier) is future:
        del wakes[tier]
    if not future.cancelled() and future.exception() is not None:
        logger.warning("waking tier %s failed: %s", tier, future.exception())


async def gather_or_cancel(*coros) -> list:
    """asyncio.gather, but when one fails the others are cancelled (their chunks stop holding queue slots)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _failure_reason(exc: BaseException) -> str | None:
    """The retryable kind of a chunk failure, or None when it must not be retried."""
    from ray.exceptions import RayActorError

    if isinstance(exc, ChunkOutOfMemory):
        return "out_of_memory"
    if isinstance(exc, ChunkBadImage):
        return "bad_image"
    if isinstance(exc, TierLost):
        return "node_lost"
    if isinstance(exc, RayActorError):
        return "replica_died"
    return None


__all__ = ["ChunkExhausted", "Dispatcher", "Outcome", "Retry", "TierLost", "TiersFull", "NoTierFits", "lost_tiers"]
