"""The in-tier request router: which replica of a tier's Generator deployment takes a chunk.

`rank_replicas` is the decision, a pure function: replicas whose card cannot hold the chunk's predicted peak (its
capacity: total memory minus what other processes hold, from NVML via `record_routing_stats`) are never chosen; the
rest are ranked by work on them (the router's own queue length count, which Serve keeps on every send, accept and
completion; only where it has none, the replica's last reported `busy`, which can be a stats period old), then whether
they already hold the chunk's LoRA adapter (Serve model multiplexing: an idle replica without it beats a busy one with
it, since loading an adapter takes far less than waiting for a job), then measured seconds per step (faster first; a
replica not measured yet counts as fastest, so new replicas get measured), then capacity (more room first). With no
replica able to hold the chunk it returns no rank and Serve keeps retrying with backoff, so the chunk waits for memory
to come back (bounded by the request's timeout) instead of failing on a card that is too full. `VramAwareRouter`
adapts it to Ray Serve's RequestRouter interface.
"""

from __future__ import annotations

import os
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


def rank_replicas(replicas: list[ReplicaView], need_bytes: int, adapter: str | None = None) -> list[list[str]]:
    """Replica ids, best first, one per rank; replicas that cannot hold `need_bytes` are left out. With `adapter`,
    replicas that hold it go before equally loaded ones that do not."""
    eligible = [r for r in replicas if r.capacity_bytes is None or r.capacity_bytes >= need_bytes]
    ordered = sorted(
        eligible,
        key=lambda r: (
            r.queue_len if r.queue_len is not None else int(r.busy),
            bool(adapter) and adapter not in r.adapters,
            r.seconds_per_step if r.seconds_per_step is not None else 0.0,
            -(r.capacity_bytes or 0),
        ),
    )
    return [[r.replica_id] for r in ordered]


class VramAwareRouter(FIFOMixin, RequestRouter):
    """Ray Serve adapter around rank_replicas. The chunk's predicted peak travels in the job (`predicted_peak`)."""

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
            views.append(ReplicaView(
                replica_id=replica.replica_id.unique_id,
                capacity_bytes=stats.get("capacity_bytes"),
                busy=bool(stats.get("busy", False)),
                queue_len=self._replica_queue_len_cache.get(replica.replica_id),
                seconds_per_step=stats.get("seconds_per_step"),
                adapters=frozenset(replica.multiplexed_model_ids),
            ))
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica_id] for replica_id in rank] for rank in rank_replicas(views, need, adapter)]
