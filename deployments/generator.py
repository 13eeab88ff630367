"""The Generator deployment: one replica per card (or one CPU replica), holding one loaded pipeline.

A plain class; `deployments.app.build_app` turns it into a deployment per tier with that tier's Ray options.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from cluster.tiers import TierConfig
from deployments.pipeline import load_pipeline, resolve_model, run_job
from deployments.schemas import GenerationJob, GenerationResult

logger = logging.getLogger("ray.serve")


def _resolve_dtype(tier: TierConfig):
    import torch

    if tier.dtype != "auto":
        return getattr(torch, tier.dtype)
    if tier.device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # float32 everywhere else: plain float16 gives NaN or black images with this model on cards without bf16.
    return torch.float32


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (unit tests, benchmarks)
        return f"{socket.gethostname()}-{os.getpid()}"


class Generator:
    """Loads the tier's pipeline once, then runs jobs one at a time.

    The pipeline call runs in a worker thread so the replica keeps answering health checks and stats while a job
    runs; the lock keeps a second job from entering the (not thread-safe) pipeline at the same time.
    """

    def __init__(self, tier: TierConfig, model: str):
        started = time.perf_counter()
        self.tier = tier
        self.dtype = _resolve_dtype(tier)
        self.device = "cuda" if tier.device == "cuda" else "cpu"
        self.model_path = resolve_model(model)
        self.pipe = load_pipeline(self.model_path, self.device, self.dtype)
        self.replica = _replica_name()
        self.load_seconds = time.perf_counter() - started
        self._lock = asyncio.Lock()
        self._step_seconds: float | None = None
        self._busy_since: float | None = None
        logger.info(
            "Generator %s (tier %s) loaded %s on %s/%s in %.2fs",
            self.replica, tier.name, self.model_path, self.device, self.dtype, self.load_seconds,
        )

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """Run one job; seeds and images come back in the same order."""
        if reason := self.tier.accepts(job.width, job.height, job.steps):
            raise ValueError(f"tier {self.tier.name} cannot run this job: {reason}")
        if len(job.seeds) > self.tier.max_batch:
            raise ValueError(f"tier {self.tier.name} runs at most {self.tier.max_batch} images per call")
        async with self._lock:
            self._busy_since = time.monotonic()
            try:
                images, seconds = await asyncio.to_thread(run_job, self.pipe, job)
            finally:
                self._busy_since = None
        self._step_seconds = seconds / job.steps
        return GenerationResult(
            images=images,
            seeds=job.seeds,
            tier=self.tier.name,
            replica=self.replica,
            device=self.device,
            seconds=seconds,
            seconds_per_step=self._step_seconds,
        )

    async def info(self) -> dict:
        """What this replica is and runs (for /v1/fleet and operators)."""
        return {
            "replica": self.replica,
            "tier": self.tier.name,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "model": str(self.model_path),
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "torch_threads": self._torch_threads(),
            "load_seconds": round(self.load_seconds, 3),
            "busy": self._busy_since is not None,
            "seconds_per_step": self._step_seconds,
        }

    @staticmethod
    def _torch_threads() -> int:
        import torch

        return torch.get_num_threads()

    async def check_health(self) -> None:
        """Serve calls this periodically; a replica whose pipeline is gone is restarted."""
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")
