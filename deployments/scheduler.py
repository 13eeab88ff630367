"""Tier choice under load, and the bounded per-tier queues of the ingress.

Pure part (`choose_chunk_tier`, `expected_seconds`): given, for every tier that can hold the chunk, its live
replicas, the work this ingress has running and waiting there, and its measured speed, pick the tier:
  1. the cheapest tier with an idle replica whose expected completion is within TIER_SLACK of the best anywhere
     (small requests stay on small cards and leave big cards free for what only they can hold);
  2. otherwise the tier with the earliest expected completion (spill up to a larger tier when the cheap one's
     queue is long and the larger one is idle, or down when the large card is the busy one);
  3. tiers whose queue is full are never chosen; when every tier that can hold the chunk is full, TiersFull says
     how long to wait (the earliest expected completion), which the API returns as 503 + Retry-After.
Expected completion = (work ahead on the tier / its replicas + this chunk) x seconds per unit of work, where a unit
is one image-token-step; seconds per unit come from chunks that finished on the tier (an EWMA of measured over
predicted time) and, for a tier not measured yet, from the time model corrected by what the other tiers measured.

Stateful part (`TierQueue`): one per tier; at most `replicas` chunks of this ingress run on the tier at once, the
rest wait ordered by priority (interactive before batch), then arrival. The queue is bounded, so nothing waits
without limit, and a replica's own queue stays empty (no request sits behind a long job when a card is free).
The queues of one dispatcher share one arrival counter, so a chunk moved from a tier that was lost to another
(deployments/dispatch.py) keeps its place: it waits behind what arrived before it and ahead of what came later.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import statistics
from dataclasses import dataclass, field

# How much slower than the best tier a cheaper idle tier may be and still be preferred. 2.0: a small card is used
# when it finishes within twice the time of the best card; beyond that, the request goes where it finishes first.
TIER_SLACK = float(os.environ.get("ZIT_TIER_SLACK", "2.0"))
# Weight of the newest measurement in a tier's speed estimate: 0.3 follows a change within a few chunks without
# jumping on one outlier.
EWMA_WEIGHT = 0.3
PRIORITIES = {"interactive": 0, "batch": 1}


class TiersFull(RuntimeError):
    """Every tier that could hold the work is at its queue limit (or, with `why`, unavailable now); retry after
    `retry_after_s`."""

    def __init__(self, retry_after_s: float, tiers: list[str], why: str | None = None):
        self.retry_after_s = retry_after_s
        why = why or f"every tier that can hold this request is full ({', '.join(tiers)})"
        super().__init__(f"{why}; retry in about {retry_after_s:.0f} s")


@dataclass
class TierLoad:
    """What the tier choice knows about one tier right now."""

    tier: str
    replicas: int
    running: int = 0
    waiting: int = 0
    backlog_units: float = 0.0  # work running + waiting on the tier, in units
    queue_limit: int = 32
    seconds_per_unit: float = 1e-6
    scalable: bool = False  # autoscaled: a tier at zero replicas starts one when work waits for it
    cold_start_s: float = 60.0  # how long that takes

    @property
    def idle(self) -> bool:
        return self.running + self.waiting < self.replicas

    @property
    def full(self) -> bool:
        return (self.replicas == 0 and not self.scalable) or self.waiting >= self.queue_limit


def expected_seconds(load: TierLoad, units: float) -> float:
    """When a chunk of `units` sent to this tier now would finish (a tier at zero: after a replica has started)."""
    if load.replicas == 0:
        if not load.scalable:
            return float("inf")
        return load.cold_start_s + (load.backlog_units + units) * load.seconds_per_unit
    wait_units = 0.0 if load.idle else load.backlog_units / load.replicas
    return (wait_units + units) * load.seconds_per_unit


def choose_chunk_tier(candidates: list[tuple[TierLoad, float]], slack: float = TIER_SLACK) -> TierLoad:
    """Pick the tier for one chunk. `candidates`: (load, units of the chunk there), cheapest tier first.

    Raises TiersFull when every candidate's queue is full (or there is none).
    """
    open_ = [(load, units) for load, units in candidates if not load.full]
    if not open_:
        finite = [expected_seconds(load, units) for load, units in candidates if load.replicas or load.scalable]
        raise TiersFull(min(finite, default=5.0), [load.tier for load, _ in candidates])
    times = [(expected_seconds(load, units), load) for load, units in open_]
    best = min(t for t, _ in times)
    for t, load in times:  # cheapest first
        if load.idle and t <= slack * best:
            return load
    return min(times, key=lambda item: item[0])[1]


@dataclass
class SpeedBook:
    """Per tier: measured seconds over predicted seconds (EWMA). Unmeasured tiers borrow the median of the others."""

    ratios: dict[str, float] = field(default_factory=dict)

    def record(self, tier: str, measured_s: float, predicted_s: float) -> None:
        if predicted_s <= 0 or measured_s <= 0:
            return
        ratio = measured_s / predicted_s
        old = self.ratios.get(tier)
        self.ratios[tier] = ratio if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * ratio

    def correction(self, tier: str) -> float:
        if tier in self.ratios:
            return self.ratios[tier]
        return statistics.median(self.ratios.values()) if self.ratios else 1.0


class TierQueue:
    """At most `replicas` chunks running on a tier; the rest wait by (priority, arrival), at most `limit` of them."""

    def __init__(self, tier: str, replicas: int, limit: int, scalable: bool = False, cold_start_s: float = 60.0,
                 arrivals: "itertools.count | None" = None):
        """`arrivals`: the arrival counter shared by every queue of a dispatcher (default: this queue's own)."""
        self.tier = tier
        self.replicas = replicas
        self.limit = limit
        self.scalable, self.cold_start_s = scalable, cold_start_s
        self.running = 0
        self.backlog_units = 0.0
        self._waiters: list[tuple[int, int, int, asyncio.Future, float]] = []
        self.arrivals = arrivals if arrivals is not None else itertools.count()
        self._ties = itertools.count()  # parts of one moved chunk share its arrival; this keeps the heap ordered

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def waiting_units(self) -> float:
        return sum(entry[-1] for entry in self._waiters)

    def set_replicas(self, replicas: int) -> None:
        self.replicas = replicas
        self._wake()

    async def acquire(self, priority: str, units: float, arrival: int | None = None) -> None:
        """Wait for a free slot on the tier, behind chunks of a higher priority or an earlier `arrival` (a number
        from `arrivals`; a new one when None). Cancelling the wait leaves the queue as if it had never joined."""
        self.backlog_units += units
        if self.running < self.replicas and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.limit:
            self.backlog_units -= units
            raise TiersFull(1.0, [self.tier])
        future = asyncio.get_running_loop().create_future()
        entry = (PRIORITIES[priority], next(self.arrivals) if arrival is None else arrival, next(self._ties), future,
                 units)
        heapq.heappush(self._waiters, entry)
        try:
            await future
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            elif future.done() and not future.cancelled():
                self.running -= 1  # the slot was handed over just as the wait was cancelled
                self._wake()
            self.backlog_units -= units
            raise

    def release(self, units: float) -> None:
        self.running -= 1
        self.backlog_units = max(0.0, self.backlog_units - units)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.running < self.replicas:
            future = heapq.heappop(self._waiters)[3]
            if not future.done():
                self.running += 1
                future.set_result(None)

    def load(self, queue_limit: int, seconds_per_unit: float) -> TierLoad:
        return TierLoad(self.tier, self.replicas, self.running, self.waiting, self.backlog_units, queue_limit,
                        seconds_per_unit, self.scalable, self.cold_start_s)
