"""The text-encoder stage: a Serve deployment that turns a request's prompt (and, when guided, its negative prompt)
into embeddings once, for every chunk, tier and retry of the request; the generators take the embeddings and hold no
encoder (cluster/stages.py says where the stage runs and why).

A plain class; `deployments.app.build_app` deploys it with the placement the service config resolved: on the card
node offering runtime.nodes.TEXT_ENCODER_RESOURCE, or on the head's CPU. It encodes with the pipeline's own
`encode_prompt` (cluster/encoding.py), one prompt at a time, and keeps what it made in a cache bounded in bytes, so
a repeated prompt costs nothing. On a simulated card it computes on the CPU while the card accounts the real
encoder's memory and time, as a Generator does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from cluster.encoding import EmbeddingCache, EncodedPrompt, cache_key, encode_prompt
from cluster.host_memory import encoder_host
from cluster.memory import encoder_peak
from cluster.pipeline import load_text_encoder, resolve_model
from cluster.profiles import Profile, apply_text_encoder_profile
from cluster.speed import encode_seconds
from cluster.weights import host_load_lock
from deployments.config import TextEncoderSettings
from deployments.hostmem import host_of
from deployments.reporting import node_id, replica_name, say_goodbye, start_reporting

logger = logging.getLogger("ray.serve")

# The fleet registry tells these reports from the generators' by this kind.
KIND = "text_encoder"


@dataclass(frozen=True)
class Encoded:
    """What the stage answers: the embeddings, whether they came from its cache, how long the call took on the
    replica, and which replica answered."""

    embeddings: EncodedPrompt
    cached: bool
    seconds: float
    replica: str


class TextEncoder:
    """Loads the folder's tokenizer and text encoder once under the stage's profile, then encodes one prompt at a
    time (a worker thread; a cache hit answers without waiting for it)."""

    def __init__(self, settings: TextEncoderSettings, model: str):
        started = time.perf_counter()
        self.settings = settings
        self.replica = replica_name()
        self.profile = Profile.model_validate(settings.profile)
        # 1. Where: the card of this Ray node (a 'card' placement), or the head's CPU.
        self.card = self._find_card() if settings.where == "card" else None
        real_gpu = self.card is not None and not self.card.simulated
        self.device = "cuda" if real_gpu else "cpu"
        # 2. Load the tokenizer and the encoder only, in the profile's dtype on a real card or the head's CPU, and in
        #    float32 on a simulated card (the generators' CPU dtype, so a seed gives the same image either way).
        import torch

        self.model_path = resolve_model(model)
        self.dtype = getattr(torch, self.profile.compute_dtype) if real_gpu or settings.where == "cpu" \
            else torch.float32
        # One replica of a host loads at a time; a simulated host holds the real encoder's host RAM.
        self.host = host_of(self.card, self.card.read() if self.card else None)
        with host_load_lock(self.host.lock_name, "loading the text-encoder stage"):
            self.host.hold_loading(encoder_host(self.profile, cuda=self.card is not None), "the text-encoder stage")
            self.pipe = load_text_encoder(self.model_path, "cpu", self.dtype,
                                          profile=self.profile if real_gpu or settings.where == "cpu" else None)
            if real_gpu:
                apply_text_encoder_profile(self.pipe, self.profile, "cuda")
            self.host.hold_loaded()
        # 3. A simulated card holds the real stage's peak from now on (what its tier was planned without: the stage
        #    may encode at any moment), and takes the real encoder's time.
        self.sim = None
        if self.card is not None and self.card.simulated:
            from cluster.simcard import SimulatedCard

            self.sim = SimulatedCard(self.card)
            self.sim.hold(encoder_peak(self.profile).total, f"the text-encoder stage ({self.profile.name})")
        self.identity = f"{self.model_path}:{self.profile.compute_dtype}"
        self.cache = EmbeddingCache(settings.cache_mb << 20)
        self.load_seconds = time.perf_counter() - started
        self._lock = asyncio.Lock()
        self._busy = False
        self._encodes = 0
        self._stop = threading.Event()
        start_reporting(self.describe, self._stop)
        logger.info("TextEncoder %s (%s) on %s loaded %s on %s/%s in %.2fs", self.replica, self.profile.name,
                    self._where(), self.model_path, self.device, str(self.dtype), self.load_seconds)

    @staticmethod
    def _find_card():
        from runtime.nodes import local_card

        card = local_card()
        if card is None:
            raise RuntimeError("the text-encoder stage landed on a node without a card; its placement resource is "
                               "on a node that is not a card's")
        if not card.simulated:  # this process computes on the node's card, whatever Ray set for a 0-GPU actor
            os.environ["CUDA_VISIBLE_DEVICES"] = card.uuid
        return card

    async def encode(self, prompt: str, negative_prompt: str | None, cfg: bool) -> Encoded:
        """The embeddings of a request (its negative prompt too when `cfg`), from the cache when it has them."""
        started = time.perf_counter()
        key = cache_key(prompt, negative_prompt, cfg, self.identity)
        found = self.cache.get(key)
        if found is not None:
            return Encoded(found, True, time.perf_counter() - started, self.replica)
        async with self._lock:  # one prompt at a time: the encoder's peak does not add up
            found = self.cache.get(key)  # encoded meanwhile by the request ahead of this one
            if found is not None:
                return Encoded(found, True, time.perf_counter() - started, self.replica)
            self._busy = True
            try:
                embeddings = await asyncio.to_thread(self._encode, prompt, negative_prompt, cfg)
            finally:
                self._busy = False
        self.cache.put(key, embeddings)
        self._encodes += 1
        return Encoded(embeddings, False, time.perf_counter() - started, self.replica)

    def _encode(self, prompt: str, negative_prompt: str | None, cfg: bool) -> EncodedPrompt:
        started = time.perf_counter()
        embeddings = encode_prompt(self.pipe, prompt, negative_prompt, cfg)
        if self.sim is not None:
            self.sim.pace(started, encode_seconds(self.profile, self.sim.spec.speed, cfg=cfg, link=self.sim.link))
        return embeddings

    def _where(self) -> str:
        if self.card is None:
            return "the head's CPU"
        reading = self.card.read()
        return f"{reading.name} [{reading.uuid}]" + (" (simulated)" if self.sim else "")

    def describe(self) -> dict:
        """What the fleet registry and GET /v1/fleet show of this stage replica."""
        card = None
        if self.card is not None:
            try:
                reading = self.card.read()
                card = {"uuid": reading.uuid, "name": reading.name, "tier": reading.tier, "host": reading.host}
            except Exception as exc:  # a lost card must not take the replica's reporting down with it
                card = {"uuid": self.card.uuid, "error": f"{exc.__class__.__name__}: {exc}"}
        return {
            "kind": KIND,
            "replica": self.replica,
            "where": self.settings.where,
            "stage_card": card,
            "profile": self.profile.name,
            "technique": self.profile.technique(),
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "host": socket.gethostname(),
            "node_id": node_id(),
            "pid": os.getpid(),
            "host_memory": self.host.describe(),
            "load_seconds": round(self.load_seconds, 3),
            "busy": self._busy,
            "encodes": self._encodes,
            "cache": self.cache.stats(),
        }

    async def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("text encoder not loaded")

    def __del__(self):
        """Serve stops the replica on purpose: leave the fleet registry first (as a Generator does)."""
        if getattr(self, "_stop", None) is not None and not self._stop.is_set():
            self._stop.set()
            say_goodbye(self.replica)
        if getattr(self, "sim", None) is not None:
            self.sim.release()
        if getattr(self, "host", None) is not None:
            self.host.release()
