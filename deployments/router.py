"""The in-tier request router: which replica of a tier's Generator deployment takes a chunk.

`rank_replicas` is the decision, a pure function: replicas whose card cannot hold the chunk's predicted peak (its
capacity: total memory minus what other processes hold, from NVML via `record_routing_stats`) are never chosen; the
rest are ranked by work on them, weighed by their speed, then whether they already hold the chunk's LoRA adapter
(Serve model multiplexing: an idle replica without it beats a busy one with it, since loading an adapter takes far
less than waiting for a job), then speed (faster first), then capacity (more room first). A replica's speed is its
step time (`step_estimates`): the time model's seconds for one reference step on its own card (its speed and PCIe
link, cluster/link.py: a card on an x1 riser is known to be slow before it has run anything) times what its jobs
measured over what the model predicted for them (the other replicas' median until it has run one). A replica k
times slower than the fastest counts as k - 1 more requests ahead (rounded down): a card 5 times slower waits until
the fast one has 4 queued, and cards within 2x of each other are ranked by work alone. Replicas without a card (a
CPU tier) are ranked by work alone, their last step time only breaking ties: it is of their last job, of any size. Work on a replica is Serve's queue length count where it has one (kept
on every send, accept and completion, forgotten 10 s after the last of them); otherwise this router's own requests
still running there, or the replica's last reported `busy`, unless that report is older than this router's last
completed request there (stats come once a period: a replica that just finished is not busy). With no replica able
to hold the chunk it returns no rank and Serve keeps retrying with backoff, so the chunk waits for memory to come
back (bounded by the request's timeout) instead of failing on a card that is too full. `VramAwareRouter` adapts it
to Ray Serve's RequestRouter interface.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

# How often Serve asks each replica for its routing stats. One second matches the NVML cache period: fresher
# numbers do not exist, staler ones let two chunks race for the same free memory.
ZIT_ROUTING_STATS_PERIOD_S = float(os.environ.get("ZIT_ROUTING_STATS_PERIOD_S", "1.0"))


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    capacity_bytes: int | None  # None: no card (CPU tier), no memory limit to check
    busy: bool = False
    queue_len: int | None = None
    seconds_per_step: float | None = None  # measured, of its last job (any size): the fallback without a reference
    reference_step_s: float | None = None  # the time model's reference step on its card (None: no card)
    time_ratio: float | None = None  # its jobs' measured over predicted seconds (None: none ran yet)
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded (or loading) on the replica
    in_flight: int = 0  # this router's requests sent to the replica and not completed
    busy_stale: bool = False  # `busy` was reported before this router's last request there completed


def load(replica: ReplicaView) -> int:
    """Requests on `replica` as best known: Serve's count, else this router's own, else its (fresh) busy report."""
    if replica.queue_len is not None:
        return replica.queue_len
    return max(replica.in_flight, int(replica.busy and not replica.busy_stale))


def step_estimates(replicas: list[ReplicaView]) -> dict[str, float]:
    """Each replica's expected seconds per reference step: its reference step x its measured-over-predicted ratio
    (the others' median until it has one, 1 with none); a replica without a reference (no card) its last measured
    step; one with neither the others' median (1.0 with none)."""
    ratios = sorted(r.time_ratio for r in replicas if r.time_ratio)
    typical_ratio = ratios[len(ratios) // 2] if ratios else 1.0
    known = {r.replica_id: (r.reference_step_s * (r.time_ratio or typical_ratio) if r.reference_step_s
                            else r.seconds_per_step)
             for r in replicas}
    values = sorted(v for v in known.values() if v)
    typical = values[len(values) // 2] if values else 1.0
    return {replica_id: value or typical for replica_id, value in known.items()}


def rank_replicas(replicas: list[ReplicaView], need_bytes: int, adapter: str | None = None) -> list[list[str]]:
    """Replica ids, best first, one per rank; replicas that cannot hold `need_bytes` are left out. A replica k times
    slower than the fastest counts k - 1 more requests ahead (rounded down). With `adapter`, replicas that hold it
    go before equally weighed ones that do not."""
    eligible = [r for r in replicas if r.capacity_bytes is None or r.capacity_bytes >= need_bytes]
    steps = step_estimates(eligible)
    fastest = min(steps.values(), default=1.0)

    def weighed_load(r: ReplicaView) -> int:
        if not r.reference_step_s:  # no card (a CPU tier): its last job's step, of any size, is no speed to weigh by
            return load(r)
        return math.floor((load(r) + 1) * steps[r.replica_id] / fastest + 1e-9) - 1

    ordered = sorted(
        eligible,
        key=lambda r: (
            weighed_load(r),
            bool(adapter) and adapter not in r.adapters,
            steps[r.replica_id],
            -(r.capacity_bytes or 0),
        ),
    )
    return [[r.replica_id] for r in ordered]


class VramAwareRouter(FIFOMixin, RequestRouter):
    """Ray Serve adapter around rank_replicas. The chunk's predicted peak travels in the job (`predicted_peak`).
    Besides Serve's queue length cache it counts its own requests per replica, which never expire, and when each
    last completed (to tell a stale `busy` report)."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._in_flight: dict = {}  # replica id -> this router's requests sent there and not completed
        self._last_done: dict = {}  # replica id -> wall-clock time this router's last request there completed

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {replica.replica_id for replica in replicas}  # replicas replaced or scaled away leave no entries
        for counts in (self._in_flight, self._last_done):
            for replica_id in set(counts) - live:
                del counts[replica_id]

    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._in_flight[replica_id] = max(0, self._in_flight.get(replica_id, 0) - 1)
        self._last_done[replica_id] = time.time()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        need, adapter = 0, None
        if pending_request is not None:
            adapter = pending_request.metadata.multiplexed_model_id or None
            if pending_request.args:
                need = int(getattr(pending_request.args[0], "predicted_peak", 0) or 0)
        views = []
        for replica in candidate_replicas:
            stats = replica.routing_stats or {}
            rid = replica.replica_id
            views.append(ReplicaView(
                replica_id=rid.unique_id,
                capacity_bytes=stats.get("capacity_bytes"),
                busy=bool(stats.get("busy", False)),
                queue_len=self.replica_queue_len_cache.get(rid),
                seconds_per_step=stats.get("seconds_per_step"),
                reference_step_s=stats.get("reference_step_s"),
                time_ratio=stats.get("time_ratio"),
                adapters=frozenset(replica.multiplexed_model_ids),
                in_flight=self._in_flight.get(rid, 0),
                busy_stale=stats.get("reported_at", 0.0) < self._last_done.get(rid, 0.0),
            ))
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica_id] for replica_id in rank] for rank in rank_replicas(views, need, adapter)]
