"""The Generator deployment: one replica per card (or one CPU replica), holding one loaded pipeline.

A plain class; `deployments.app.build_app` turns it into a deployment per tier with that tier's Ray options.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time

from cluster.host_memory import replica_host
from cluster.link import DEFAULT_LINK, link_of, measure_copy_rate
from cluster.memory import effective_budget, for_prompt, predict_peak, resident_bytes, smallest_request, uses_cfg
from cluster.nvml import NvmlMonitor
from cluster.pipeline import BadImages, load_pipeline, resolve_model, run_job
from cluster.profiles import apply_vae, degraded_profile
from cluster.requests import GenerationJob, GenerationResult, work_units
from cluster.speed import predict_seconds, reference_step_s
from cluster.tiers import TierConfig
from cluster.weights import host_load_lock
from deployments.errors import ChunkBadImage, ChunkOutOfMemory
from deployments.hostmem import host_of, trim_host_memory
from deployments.lora import LoraSettings, adapter_to_dtype
from deployments.progress import ReplicaProgress
from deployments.reporting import node_id, replica_name, say_goodbye, start_reporting

logger = logging.getLogger("ray.serve")


# How long a replica reports the ingress's queue it last heard of (record_autoscaling_stats).
QUEUE_SEEN_TTL_S = 10.0
class JobCancelled(RuntimeError):
    """The caller went away; the pipeline stopped early."""


class LoadedAdapter:
    """What Serve's multiplexing caches per adapter; Serve calls __del__ when it evicts one."""

    def __init__(self, owner: "Generator", name: str):
        self.owner, self.name, self._gone = owner, name, False

    def __del__(self):
        if self._gone or sys is None or sys.is_finalizing():  # at exit the pipeline goes with the process
            return
        self._gone = True
        try:
            self.owner._unload_adapter(self.name)
        except Exception:  # eviction must never take the replica down
            logger.exception("unloading LoRA %s failed", self.name)


class Generator:
    """Finds its card, loads the tier's pipeline under the tier's profile once, then runs jobs one at a time.

    On a real card the pipeline runs on CUDA with the profile applied through diffusers. On a simulated card the tiny
    model computes on the CPU while the card accounts memory for the real model under the same profile, and refuses
    (OutOfMemoryError) what would not fit. On the CPU tier there is no card.

    The pipeline call runs in a worker thread so the replica keeps answering health checks and stats while a job
    runs; the lock keeps a second job from entering the (not thread-safe) pipeline at the same time.
    """

    def __init__(self, tier: TierConfig, model: str, lora: LoraSettings | None = None):
        from cluster.profiles import tier_profile

        started = time.perf_counter()
        self.tier = tier
        self.replica = replica_name()
        # 1. Which card: the one of this Ray node (none on the CPU tier).
        self.card = self._find_card() if tier.device == "cuda" else None
        snapshot = self.card.read() if self.card else None
        self.card_info = snapshot.to_dict() if snapshot else None
        # NVML is read by a background thread; stats and reports use its cached reading, never the driver.
        self.monitor = NvmlMonitor(self.card.nvml, indices=[self.card.index]) if self.card else None
        # 2. The tier's profile (the same one the ingress plans with: safe for every card of the tier; it reserves
        #    memory for the LoRA adapters this replica may hold).
        self.lora = lora
        self.profile = tier_profile(tier, lora.reserved_params if lora else 0)
        self._smallest_peak = smallest_request(self.profile).total  # below this room the card is unusable
        if snapshot is not None and tier.bf16 and not snapshot.bf16:
            raise RuntimeError(f"{snapshot.name} has no bf16 but tier {tier.name} was configured with bf16=true")
        # 3. Where the pixels are computed: CUDA for a real card, else the CPU. A real card's link is measured now,
        #    before the weights take its memory (a short pinned copy, cluster/link.py); a simulated one's is what its
        #    fleet file gives.
        real_gpu = self.card is not None and not self.card.simulated
        self.device = "cuda" if real_gpu else "cpu"
        self.link = link_of(snapshot, self._measure_link() if real_gpu else None) if snapshot is not None else None
        # 4. Load (and on a real card, apply the profile's memory techniques).
        import torch

        self.model_path = resolve_model(model)
        dtype = getattr(torch, self.profile.compute_dtype) if real_gpu else torch.float32
        # With the text-encoder stage the pipeline has no encoder: it is neither read nor held (host RAM, VRAM).
        self.own_encoder = self.profile.text_encoder != "stage"
        # The host's replicas load one at a time (their load peaks must not add up); a simulated host holds the real
        # model's host RAM by the host-memory model, and refuses a replica it cannot hold.
        self.host = host_of(self.card, snapshot)
        with host_load_lock(self.host.lock_name, f"loading a {tier.name} replica"):
            self.host.hold_loading(replica_host(self.profile, cuda=self.card is not None), f"a {tier.name} replica")
            # On a card: each component in the profile's dtypes, a view of the host's one stored copy
            # (cluster/weights.py).
            self.pipe = load_pipeline(self.model_path, "cpu" if real_gpu else self.device, dtype,
                                      text_encoder=self.own_encoder, profile=self.profile if real_gpu else None)
            if real_gpu:
                from cluster.profiles import apply_profile

                apply_profile(self.pipe, self.profile, "cuda")
            self.host.hold_loaded()
        self.dtype = dtype
        # 5. A simulated card holds the real model's resident memory under this profile from now on.
        self.sim = None
        if self.card is not None and self.card.simulated:
            from cluster.simcard import SimulatedCard

            # Capped like the CUDA allocator on a real card (profile max_memory_gb; a split card's slot).
            self.sim = SimulatedCard(self.card, effective_budget(self.profile, snapshot.memory_total))
            self._resident = resident_bytes(tier_profile(tier))  # without adapters: they are held as they load
            self.sim.hold(self._resident, f"{self.profile.name} resident weights")
            self.monitor.refresh()  # reports never show the card as it was before the weights were on it
        # 6. LoRA adapters: loaded on first use, at most lora.slots kept (Serve model multiplexing, LRU).
        self._adapters: dict[str, int] = {}  # name -> bytes it holds on the card
        self._fused: tuple[str, float] | None = None
        if lora is not None:
            from ray import serve

            async def adapter(name: str) -> LoadedAdapter:
                return await asyncio.to_thread(self._load_adapter, name)

            self.adapter = serve.multiplexed(max_num_models_per_replica=lora.slots)(adapter)
        self.load_seconds = time.perf_counter() - started
        self._lock = asyncio.Lock()
        self._step_seconds: float | None = None
        # Measured over predicted seconds of this replica's jobs (EWMA; None until one ran) and the predicted seconds
        # of one reference step here: the in-tier router ranks replicas by their product (deployments/router.py).
        self._time_ratio: float | None = None
        self._reference_step_s = reference_step_s(self.profile, snapshot.speed, self._known_link()) \
            if snapshot is not None else None
        self._busy_since: float | None = None
        # What the tier's autoscaler reads (record_autoscaling_stats): busy time, throughput, the ingress's queue.
        self._busy_total = 0.0
        self._stats_at = (time.monotonic(), 0.0)
        self._units_per_s: float | None = None
        self._queue_seen: tuple[float, int, float] = (0.0, 0, 0.0)  # (when, chunks, units)
        self._jobs = 0
        self._stop = threading.Event()
        self.progress = ReplicaProgress()  # per-step reports for progress bars
        start_reporting(self.describe, self._stop)
        logger.info(
            "Generator %s (tier %s, profile %s) on %s loaded %s on %s/%s in %.2fs",
            self.replica, tier.name, self.profile.name,
            f"{snapshot.name} [{snapshot.uuid}]" + (" (simulated)" if self.sim else "") if snapshot else "the CPU",
            self.model_path, self.device, str(self.dtype), self.load_seconds,
        )

    def _known_link(self):
        """The link the service plans this replica's card with: its own (measured, else its PCIe link's rate), or the
        default when the service ignores links (`link_aware: false`)."""
        return self.link if self.tier.link_aware else DEFAULT_LINK

    def _measure_link(self) -> float | None:
        """This card's host-to-device bytes per second, timed once (None, with a log line, if the copy fails)."""
        try:
            return measure_copy_rate("cuda")
        except Exception as exc:  # a card too full for the short copy still serves, at its PCIe link's rate
            logger.warning("could not time the host-to-device link of %s: %s", self.replica, exc)
            return None

    @staticmethod
    def _find_card():
        from runtime.nodes import local_card

        card = local_card()
        if card is None:
            raise RuntimeError("a cuda tier replica landed on a node without a card; give the tier its vram resource")
        return card

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """Run one job; seeds and images come back in the same order.

        Out of memory: free the cache and retry once on this card with the degraded profile (smaller VAE tiles,
        slicing); if that fails too, raise ChunkOutOfMemory so the ingress moves the chunk to a larger tier.
        All-black or NaN images raise ChunkBadImage so the ingress moves the chunk to a card with bf16.
        """
        import torch

        if job.encoded is None and not self.own_encoder:
            raise ValueError(f"replica {self.replica} has no text encoder (the service's text-encoder stage encodes "
                             "for it): send the job with the stage's embeddings in `encoded`")
        if job.steps > self.profile.max_steps or len(job.seeds) > self.profile.max_n:
            raise ValueError(f"profile {self.profile.name} takes at most {self.profile.max_n} images and "
                             f"{self.profile.max_steps} steps per call; got {len(job.seeds)} and {job.steps}")
        if job.tier_queue is not None:
            self._queue_seen = (time.monotonic(), *job.tier_queue)
        async with self._lock:
            self._busy_since = time.monotonic()
            degraded = None
            try:
                if job.lora:
                    if self.lora is None:
                        raise ValueError(f"job asks for LoRA {job.lora!r} but this service has no LoRA folder")
                    try:
                        await self._adapter_for(job.lora)
                    except torch.OutOfMemoryError as exc:
                        raise ChunkOutOfMemory(f"{self.tier.name}: LoRA {job.lora}: {str(exc).splitlines()[0]}") from None
                try:
                    images, seconds = await self._in_thread(job, self.profile)
                except torch.OutOfMemoryError as exc:
                    self._free_cache()
                    degraded = degraded_profile(self.profile)
                    if degraded is None:
                        raise ChunkOutOfMemory(f"{self.tier.name}: {str(exc).splitlines()[0]}") from None
                    logger.warning("out of memory on %s; retrying with %s", self.replica, degraded.technique())
                    try:
                        images, seconds = await self._in_thread(job, degraded)
                    except torch.OutOfMemoryError as again:
                        self._free_cache()
                        raise ChunkOutOfMemory(f"{self.tier.name}: {str(again).splitlines()[0]}") from None
                    finally:
                        if self.device == "cuda":
                            apply_vae(self.pipe, self.profile)
            except BadImages as exc:
                raise ChunkBadImage(f"{self.tier.name} ({self.profile.compute_dtype}): {exc}") from None
            finally:
                self._busy_total += time.monotonic() - self._busy_since
                self._busy_since = None
        self._jobs += 1
        self._step_seconds = seconds / job.steps
        if self._reference_step_s is not None:
            predicted = self._predicted_seconds(job, self.profile).total_s
            ratio = seconds / max(predicted, 1e-9)
            self._time_ratio = ratio if self._time_ratio is None else 0.7 * self._time_ratio + 0.3 * ratio
        units = work_units(job.width, job.height, len(job.seeds), job.steps, uses_cfg(job.guidance_scale))
        measured = units / max(seconds, 1e-6)
        self._units_per_s = measured if self._units_per_s is None else 0.7 * self._units_per_s + 0.3 * measured
        return GenerationResult(
            images=images,
            seeds=job.seeds,
            tier=self.tier.name,
            replica=self.replica,
            device=self.device,
            seconds=seconds,
            seconds_per_step=self._step_seconds,
            degraded=degraded is not None,
        )

    async def _adapter_for(self, name: str) -> None:
        """Load adapter `name` through Serve's multiplexing (evicting the least recently used) or find it loaded.
        A load the caller abandons still runs to its end under the job lock, as a pipeline call does: the next job
        never meets a half-loaded adapter."""
        load = asyncio.ensure_future(self.adapter(name))
        try:
            await asyncio.shield(load)
        except asyncio.CancelledError:
            try:
                await load
            except BaseException:  # the load was abandoned; how it ended does not matter
                pass
            raise

    async def _in_thread(self, job: GenerationJob, profile) -> tuple[list[bytes], float]:
        """Run the job in a worker thread. If the caller goes away (client disconnected, request timed out), the
        pipeline stops at its next step and the card is free; the lock is held until the thread has really ended,
        so the next job never shares the pipeline with an abandoned one."""
        cancel = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._run, job, profile, cancel))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            cancel.set()
            try:
                await work
            except BaseException:  # the job was abandoned; how it ended does not matter
                pass
            logger.info("job %s cancelled by its caller; the pipeline stopped", job.seeds)
            raise

    def _run(self, job: GenerationJob, profile, cancel: threading.Event) -> tuple[list[bytes], float]:
        """One pipeline call under `profile` (a worker thread). A simulated card accounts the real model's memory,
        refuses what does not fit, and takes the time the real model would take there (scaled)."""
        report = self.progress.reporter(job)  # per-step progress of the request (deployments/progress.py)

        def on_step(step: int, steps: int) -> None:
            if cancel.is_set():
                raise JobCancelled(f"cancelled at step {step} of {steps}")
            if report is not None:
                report(step, steps)

        if self.device == "cuda" and profile is not self.profile:
            apply_vae(self.pipe, profile)
        self._use_adapter(job)
        try:
            return self._compute(job, profile, on_step, cancel)
        finally:
            trim_host_memory()  # what the job freed goes back to the host (deployments/hostmem.py)

    def _predicted_seconds(self, job: GenerationJob, profile, link=None):
        """The time model's Timing of `job` under `profile` on this card (at `link`, else the link the service plans
        it with), with the prompt tokens the transformer gets."""
        cal = for_prompt(None, job.encoded.transformer_tokens if job.encoded is not None else None)
        speed = self.sim.spec.speed if self.sim is not None else (self.card_info or {}).get("speed") or 1.0
        return predict_seconds(job.width, job.height, len(job.seeds), job.steps, profile, speed, cal,
                               cfg=uses_cfg(job.guidance_scale), link=link or self._known_link())

    def _compute(self, job: GenerationJob, profile, on_step, cancel: threading.Event) -> tuple[list[bytes], float]:
        if self.sim is None:
            return run_job(self.pipe, job, on_step=on_step)
        started = time.perf_counter()
        n = len(job.seeds)
        cfg = uses_cfg(job.guidance_scale)  # guided: the real transformer would run 2n latents per step
        # The prompt's real tokens when the stage encoded it (the real transformer runs those), else the bound.
        cal = for_prompt(None, job.encoded.transformer_tokens if job.encoded is not None else None)
        peak = predict_peak(job.width, job.height, n, profile, cal, cfg=cfg)
        guided = f" guided (guidance_scale {job.guidance_scale:g})" if cfg else ""
        with self.sim.running(peak.total, f"{job.width}x{job.height} n={n}{guided} under {profile.name}"):
            images, _ = run_job(self.pipe, job, on_step=on_step, latents_hook=self.sim.latents_hook())
            # The card's own link, whatever the service plans with: a simulated card takes the time it implies.
            self.sim.pace(started, self._predicted_seconds(job, profile, self.sim.link).total_s, cancel)
        return images, time.perf_counter() - started

    # -- LoRA adapters (deployments/lora.py) ---------------------------------------------------------------------

    def _load_adapter(self, name: str) -> "LoadedAdapter":
        """Load adapter `name` from the LoRA folder (a worker thread, under the job lock). A simulated card holds its
        bytes from now on and refuses it, like a real card, when they do not fit."""
        from cluster.memory import DTYPE_BYTES
        from deployments.lora import LoraLibrary, adapter_params

        path = LoraLibrary(self.lora.folder).check(name, self.lora)
        nbytes = adapter_params(path) * DTYPE_BYTES[self.profile.compute_dtype]
        if self.sim is not None:
            self.sim.hold(self._resident + sum(self._adapters.values()) + nbytes, f"LoRA {name}")
        started = time.perf_counter()
        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        import torch

        adapter_to_dtype(self.pipe, name, getattr(torch, self.profile.compute_dtype) if self.device == "cuda"
                         else self.dtype)
        self._adapters[name] = nbytes
        logger.info("LoRA %s loaded on %s in %.2fs (%d bytes)", name, self.replica, time.perf_counter() - started,
                    nbytes)
        return LoadedAdapter(self, name)

    def _unload_adapter(self, name: str) -> None:
        """Serve evicted `name` (least recently used past lora.slots): take it out of the pipeline and off the card."""
        if name not in self._adapters:
            return
        if self._fused is not None and self._fused[0] == name:
            self.pipe.unfuse_lora()
            self._fused = None
        self.pipe.delete_adapters(name)
        del self._adapters[name]
        if self.sim is not None:
            self.sim.hold(self._resident + sum(self._adapters.values()), "the resident weights")
        logger.info("LoRA %s unloaded from %s", name, self.replica)

    def _use_adapter(self, job: GenerationJob) -> None:
        """Make the pipeline run `job`'s adapter at its scale, or none: set (or fuse) it, or disable LoRA."""
        if not self._adapters:
            return
        want = (job.lora, job.lora_scale) if job.lora else None
        if self._fused is not None and self._fused != want:
            self.pipe.unfuse_lora()
            self._fused = None
        if want is None:
            self.pipe.disable_lora()
            return
        if self._fused == want:
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([job.lora], adapter_weights=[job.lora_scale])
        if self.lora.fuse and self._can_fuse():
            self.pipe.fuse_lora(adapter_names=[job.lora])
            self._fused = want

    def _can_fuse(self) -> bool:
        """Fusing rewrites the transformer's weights: only when they are resident in their compute dtype."""
        return self.profile.weights == "resident" and self.profile.transformer_storage == self.profile.compute_dtype

    def _free_cache(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _capacity(self) -> tuple[int | None, int | None]:
        """(the most this replica could hold on its card now, the card's free memory) from the cached NVML reading:
        (None, None) without a card, capacity 0 when NVML has lost it."""
        if self.monitor is None:
            return None, None
        readings = self.monitor.latest()
        if not readings:
            return 0, None  # the card is lost: route nothing here
        card = readings[0]
        # What this replica could grow into: what others leave, no further than its cap (a split card's slot).
        return effective_budget(self.profile, card.memory_total - card.foreign_memory), card.memory_free

    def _card_unusable(self) -> bool:
        """NVML lost the card, or other processes leave this replica no room for even the smallest request."""
        capacity, _ = self._capacity()
        return capacity is not None and capacity < self._smallest_peak

    def record_routing_stats(self) -> dict:
        """What the in-tier router ranks replicas by (Serve polls this; it reads only cached values)."""
        capacity, free = self._capacity()
        return {
            "capacity_bytes": capacity,
            "free_bytes": free,
            "busy": self._busy_since is not None,
            "seconds_per_step": self._step_seconds,
            "reference_step_s": self._reference_step_s,
            "time_ratio": self._time_ratio,
            "reported_at": time.time(),  # wall clock: the router compares it with when its requests completed
        }

    async def wake(self, queued: int, queued_units: float) -> None:
        """The ingress has work waiting for this tier, which had no replica: Serve held this call until this
        replica was up. Remember the queue for the autoscaler."""
        self._queue_seen = (time.monotonic(), queued, queued_units)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for the tier's autoscaler (autoscaling/serve_policy.py), called by Serve periodically:
        the share of time spent computing since the last call, measured work units per second, the model load
        time, the ingress's queue for this tier as the last job or wake-up told it (forgotten after
        QUEUE_SEEN_TTL_S: no news means the ingress has sent nothing new), and whether the card is unusable (NVML
        lost it, or other processes took so much of it that not even the smallest request fits)."""
        now = time.monotonic()
        busy = self._busy_total + (now - self._busy_since if self._busy_since is not None else 0.0)
        then, busy_then = self._stats_at
        self._stats_at = (now, busy)
        seen_at, queued, queued_units = self._queue_seen
        fresh = now - seen_at <= QUEUE_SEEN_TTL_S
        return {
            "busy_fraction": (busy - busy_then) / (now - then) if now > then else 0.0,
            "units_per_s": self._units_per_s or 0.0,
            "load_s": self.load_seconds,
            "queued": float(queued) if fresh else 0.0,
            "queued_units": float(queued_units) if fresh else 0.0,
            "card_unusable": 1.0 if self._card_unusable() else 0.0,
        }

    def describe(self) -> dict:
        """What this replica is and runs, with a fresh reading of its card (for /v1/fleet and operators)."""
        card = None
        if self.monitor is not None:
            readings = self.monitor.latest()
            if readings:
                card = readings[0].to_dict()
            else:  # a lost card must not take the replica's reporting down with it
                card = {**(self.card_info or {}), "error": self.monitor.error}
        return {
            "replica": self.replica,
            "tier": self.tier.name,
            "profile": self.profile.name,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "model": str(self.model_path),
            "host": socket.gethostname(),
            "node_id": node_id(),
            "pid": os.getpid(),
            "card": card,
            "host_memory": self.host.describe(),
            "simulated": self.sim is not None,
            "load_seconds": round(self.load_seconds, 3),
            "busy": self._busy_since is not None,
            "jobs": self._jobs,
            "seconds_per_step": self._step_seconds,
            "link": self.link.as_dict() if self.link is not None else None,
            "reference_step_s": self._reference_step_s,
            "time_ratio": self._time_ratio,
            "torch_threads": self._torch_threads(),
            "loras": sorted(self._adapters),
            "fused_lora": self._fused[0] if self._fused else None,
        }

    @staticmethod
    def _torch_threads() -> int:
        import torch

        return torch.get_num_threads()

    async def check_health(self) -> None:
        """Serve calls this periodically; a replica whose pipeline is gone is restarted."""
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")

    def __del__(self):
        """Serve calls this when it stops the replica on purpose (scale-down, redeploy). The replica leaves the fleet
        registry before it goes, so its card's silence is not read as a card that stopped reporting."""
        if getattr(self, "_stop", None) is not None and not self._stop.is_set():
            self._stop.set()
            say_goodbye(self.replica)
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        if getattr(self, "sim", None) is not None:
            self.sim.release()
        if getattr(self, "host", None) is not None:
            self.host.release()
