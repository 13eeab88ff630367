"""The in-tier request router: which replica of a tier's Generator deployment takes a chunk.

`rank_replicas` is the decision, a pure function: replicas whose card cannot hold the chunk's predicted peak (its
capacity: total memory minus what other processes hold, from NVML via `record_routing_stats`) are never chosen; the
rest are ranked by work on them, then whether they already hold the chunk's LoRA adapter (Serve model multiplexing:
an idle replica without it beats a busy one with it, since loading an adapter takes far less than waiting for a job),
then measured seconds per step (faster first; a replica not measured yet counts as fastest, so new replicas get
measured), then capacity (more room first). Work on a replica is Serve's queue length count where it has one (kept
on every send, accept and completion, forgotten 10 s after the last of them); otherwise this router's own requests
still running there, or the replica's last reported `busy`, unless that report is older than this router's last
completed request there (stats come once a period: a replica that just finished is not busy). With no replica able
to hold the chunk it returns no rank and Serve keeps retrying with backoff, so the chunk waits for memory to come
back (bounded by the request's timeout) instead of failing on a card that is too full. `VramAwareRouter` adapts it
to Ray Serve's RequestRouter interface.
"""

from __future__ import annotations

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
    seconds_per_step: float | None = None
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded (or loading) on the replica
    in_flight: int = 0  # this router's requests sent to the replica and not completed
    busy_stale: bool = False  # `busy` was reported before this router's last request there completed


def load(replica: ReplicaView) -> int:
    """Requests on `replica` as best known: Serve's count, else this router's own, else its (fresh) busy report."""
    if replica.queue_len is not None:
        return replica.queue_len
    return max(replica.in_flight, int(replica.busy and not replica.busy_stale))


def rank_replicas(replicas: list[ReplicaView], need_bytes: int, adapter: str | None = None) -> list[list[str]]:
    """Replica ids, best first, one per rank; replicas that cannot hold `need_bytes` are left out. With `adapter`,
    replicas that hold it go before equally loaded ones that do not."""
    eligible = [r for r in replicas if r.capacity_bytes is None or r.capacity_bytes >= need_bytes]
    ordered = sorted(
        eligible,
        key=lambda r: (
            load(r),
            bool(adapter) and adapter not in r.adapters,
            r.seconds_per_step if r.seconds_per_step is not None else 0.0,
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
                adapters=frozenset(replica.multiplexed_model_ids),
                in_flight=self._in_flight.get(rid, 0),
                busy_stale=stats.get("reported_at", 0.0) < self._last_done.get(rid, 0.0),
            ))
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica_id] for replica_id in rank] for rank in rank_replicas(views, need, adapter)]
