"""The host-memory model: the host RAM a replica keeps and peaks at while loading, and what a host's replicas need.

The VRAM model (cluster/memory.py) says what fits on a card; this one says what its host must hold for it, for the
load path the replicas run (cluster/pipeline.py load_pipeline, cluster/profiles.py apply_profile):

- every component is loaded as views of the host's ONE stored copy of it in the dtypes it runs in (the weights
  cache, cluster/weights.py): the pages of a memory-mapped file, shared by every process of the host that maps it;
- a resident component goes to the card and keeps nothing on the host;
- an offloaded component is read from those shared pages at every step: group offload with streams keeps the
  views (diffusers' `low_cpu_mem_usage`) and pins each group as it is sent, so the process privately holds only
  PyTorch's pinned staging blocks (the groups in flight, rounded up to a power of two: `*_pinned_rounding`);
  group offload without streams and model CPU offload move weights back as fresh private copies; sequential
  offload and a component computing on the CPU in its stored dtype keep the views (one computing in a wider dtype
  than it is stored in holds private copies: layerwise casting on the CPU swaps each leaf for a copy);
- the load: a replica whose stored copy is missing writes it, tensor by tensor, holding one shard
  (cluster/weights.py SHARD_BYTES) and one tensor; replicas of one host load one at a time (a host-wide lock), so
  load peaks never add up.

Per replica process: `runtime` (Python, torch, diffusers, the Ray worker: `host_runtime_bytes`; on a card also the
CUDA runtime's host side: `host_cuda_bytes`), its private weights, its `shared` weight sets (by name: counted once
per host however many replicas map them) and its load transient. Per host: the replicas' private bytes, each
shared set once, the largest load transient, and the Ray processes: one set per Ray node (a node per card:
`host_ray_node_bytes`, and its Serve proxy: `host_proxy_bytes`) and the head's on the host that runs it (`host_head_bytes`).

Computed: weights (parameter counts x dtype bytes), pinned rounding (power-of-two blocks of the real parameter
shapes), the cache writer's shard. Estimated until measured on a card's host: the CUDA runtime's host side.
Measured on this project's CPU machine: the process runtime, a Ray node's and the head's processes.
docs/memory.md has the figures.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from cluster.memory import GIB, Calibration, load_calibration
from cluster.profiles import DTYPE_BYTES, Profile

GROUP_OFFLOAD = ("group_offload_block", "group_offload_leaf")
# What the cache writer holds at most: one shard (cluster/weights.py SHARD_BYTES, 1 GiB) or the largest tensor (the
# text encoder's embedding in float32, 1.45 GiB), with the cast's temporary; measured up to 1.45 GiB over the
# replica's own (bench/host_memory.py, docs/benchmarks.md).
CACHE_WRITE_BYTES = 3 << 29  # 1.5 GiB


@dataclass(frozen=True)
class HostEstimate:
    """Host bytes of one replica process, term by term."""

    runtime: int  # the process: Python, torch, diffusers, Ray worker (+ the CUDA runtime's host side on a card)
    private: int  # weights and pinned staging only this process holds
    shared: dict[str, int]  # weight sets read from the host's stored copy, by name: once per host
    load_transient: int  # extra private bytes at the worst moment of the load (writing a missing stored copy)

    @property
    def steady(self) -> int:
        """What the process keeps, counting its shared sets as if it were alone on the host."""
        return self.runtime + self.private + sum(self.shared.values())

    @property
    def load_peak(self) -> int:
        return self.steady + self.load_transient

    def terms(self) -> dict:
        """Every term in GiB (3 decimals), for JSON and tables."""
        gib = lambda n: round(n / GIB, 3)  # noqa: E731
        return {"runtime": gib(self.runtime), "private": gib(self.private),
                "shared": {k: gib(v) for k, v in self.shared.items()}, "load_transient": gib(self.load_transient),
                "steady": gib(self.steady), "load_peak": gib(self.load_peak)}


def _sets(component: str, params: int, skipped: int, storage: str, compute: str) -> dict[str, int]:
    """The weight sets of a component as the weights cache stores them (cluster/weights.py parts): its
    layerwise-cast leaves in `storage` (one set for every compute dtype; an 8-bit store is cast through bfloat16)
    and the rest (`skipped` params) in `compute`."""
    via = "bfloat16" if DTYPE_BYTES[storage] < 2 else storage
    leaves = f"{component}-leaves-{storage}" + (f"-via-{via}" if via != storage else "")
    return {leaves: (params - skipped) * DTYPE_BYTES[storage], f"{component}-rest-{compute}": skipped * DTYPE_BYTES[compute]}


def _component_host(component: str, where: str, params: int, skipped: int, storage: str, compute: str,
                    group_params: int, in_flight: int, rounding: float, stream: bool
                    ) -> tuple[int, dict[str, int]]:
    """(private bytes, {shared set: bytes}) of one component placed `where` ('card', 'group', 'model', 'sequential'
    or 'cpu'); a group offload sends `group_params` at a time (`in_flight` groups at once) and the skipped params
    (the embedding) as one more group."""
    sets = _sets(component, params, skipped, storage, compute)
    if where == "card":
        return 0, {}
    if where == "group" and stream:  # views of the stored copy; pinned staging for the groups in flight
        staging = (in_flight * group_params * DTYPE_BYTES[storage] + skipped * DTYPE_BYTES[compute]) * rounding
        return int(staging), sets
    if where in ("group", "model"):  # offloaded back as fresh private copies
        return sum(sets.values()), {}
    if where == "cpu" and storage != compute:
        # Layerwise casting on the CPU swaps each leaf for an upcast copy and back (diffusers' hooks call
        # module.to): after the first forward every leaf is a private copy, not a view.
        return sum(sets.values()), {}
    return 0, sets  # sequential offload, or computing on the CPU in the stored dtype: the views themselves


def replica_host(profile: Profile, calibration: Calibration | None = None, cuda: bool = True) -> HostEstimate:
    """Host bytes of a generator replica running `profile` on a card (`cuda`), or on the CPU (every component
    computes from its views). See the module docstring."""
    cal = calibration or load_calibration()
    stream = cuda and profile.offload_stream
    in_flight = 2 if stream else 1
    placement = {"group_offload_block": "group", "group_offload_leaf": "group", "model_cpu_offload": "model",
                 "sequential_cpu_offload": "sequential"}.get(profile.weights, "card")
    if not cuda:
        placement = "cpu"
    group = cal.transformer_block_params if profile.weights == "group_offload_block" else cal.transformer_leaf_params
    private, shared = _component_host("transformer", placement, cal.transformer_params, cal.transformer_skipped_params,
                                      profile.transformer_storage, profile.compute_dtype, group, in_flight,
                                      cal.transformer_pinned_rounding, stream)
    if profile.text_encoder != "stage" and (profile.text_encoder != "gpu" or not cuda):  # stage: no encoder here
        te_private, te_shared = _encoder_host(profile, cal, cuda)
        private += te_private
        shared.update(te_shared)
    vae = cal.vae_params * DTYPE_BYTES[profile.compute_dtype]
    if not cuda or profile.weights == "sequential_cpu_offload":
        shared[f"vae-rest-{profile.compute_dtype}"] = vae
    elif profile.weights == "model_cpu_offload":
        private += vae
    runtime = int(cal.host_runtime_bytes + (cal.host_cuda_bytes if cuda else 0))
    return HostEstimate(runtime, int(private), shared, CACHE_WRITE_BYTES)


def _encoder_host(profile: Profile, cal: Calibration, cuda: bool) -> tuple[int, dict[str, int]]:
    where = {"offload": "group", "gpu": "card", "cpu": "cpu"}.get(profile.text_encoder, "card")
    if profile.text_encoder == "offload" and profile.weights in ("model_cpu_offload", "sequential_cpu_offload"):
        where = "model" if profile.weights == "model_cpu_offload" else "sequential"
    if not cuda:
        where = "cpu"
    stream = cuda and profile.offload_stream
    return _component_host("text_encoder", where, cal.text_encoder_params, cal.text_encoder_skipped_params,
                           profile.text_encoder_storage, profile.compute_dtype, cal.text_encoder_layer_params,
                           2 if stream else 1, cal.text_encoder_pinned_rounding, stream)


def encoder_host(profile: Profile, calibration: Calibration | None = None, cuda: bool = True) -> HostEstimate:
    """Host bytes of a text-encoder stage replica (cluster/stages.py stage_profile): the runtime and the encoder
    placed as its profile says; no transformer, no VAE. `cuda`: on a card (else the head's CPU)."""
    cal = calibration or load_calibration()
    private, shared = _encoder_host(profile, cal, cuda and profile.text_encoder != "cpu")
    runtime = int(cal.host_runtime_bytes + (cal.host_cuda_bytes if cuda else 0))
    return HostEstimate(runtime, int(private), shared, CACHE_WRITE_BYTES)


def ray_node_bytes(cal: Calibration) -> int:
    """Host RAM of one card's Ray node beside its replicas: the raylet and agents, and the Serve HTTP proxy every
    node with a replica runs (deployments/app.py PROXY_LOCATION)."""
    return int(cal.host_ray_node_bytes + cal.host_proxy_bytes)


@dataclass
class HostNeed:
    """What one host's replicas need in host RAM, and what it has (`ram_bytes`; None when unknown)."""

    host: str
    ram_bytes: int | None
    replicas: list[tuple[str, HostEstimate]] = field(default_factory=list)  # (what runs, its estimate)
    ray_nodes: int = 0
    head: bool = False
    calibration: Calibration | None = None
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (card, why) for cards this host cannot hold
    changed: list[str] = field(default_factory=list)  # what planning changed so that its cards fit, and why

    def _cal(self) -> Calibration:
        return self.calibration or load_calibration()

    @property
    def fixed(self) -> int:
        """The Ray processes: one set per Ray node (a node per card) with its Serve proxy, the head's on the head
        host."""
        cal = self._cal()
        return int(self.ray_nodes * ray_node_bytes(cal) + (cal.host_head_bytes if self.head else 0))

    @property
    def shared(self) -> dict[str, int]:
        """The weight sets the host's replicas map, each once."""
        out: dict[str, int] = {}
        for _, estimate in self.replicas:
            out.update(estimate.shared)
        return out

    @property
    def steady(self) -> int:
        private = sum(e.runtime + e.private for _, e in self.replicas)
        return self.fixed + private + sum(self.shared.values())

    @property
    def need(self) -> int:
        """Steady bytes plus the largest one load transient (replicas start one at a time)."""
        return self.steady + max((e.load_transient for _, e in self.replicas), default=0)

    def with_replica(self, what: str, estimate: HostEstimate, ray_node: bool = True) -> "HostNeed":
        return HostNeed(self.host, self.ram_bytes, [*self.replicas, (what, estimate)],
                        self.ray_nodes + (1 if ray_node else 0), self.head, self.calibration, list(self.left_out),
                        list(self.changed))

    def refusal(self, what: str, estimate: HostEstimate, ray_node: bool = True) -> str | None:
        """None when the host also holds `what`, else why not, with the numbers."""
        after = self.with_replica(what, estimate, ray_node)
        if self.ram_bytes is None or after.need <= self.ram_bytes:
            return None
        mapped = f", mapping {sum(estimate.shared.values()) / GIB:.1f} GiB of weights" if estimate.shared else ""
        return (f"host {self.host} has {self.ram_bytes / GIB:.1f} GiB of RAM; with {what} ("
                f"{(estimate.runtime + estimate.private) / GIB:.1f} GiB of its own{mapped}) its replicas would need "
                f"{after.need / GIB:.1f} GiB")

    def to_dict(self) -> dict:
        return {
            "host": self.host,
            "ram_gb": round(self.ram_bytes / GIB, 2) if self.ram_bytes is not None else None,
            "need_gb": round(self.need / GIB, 2),
            "steady_gb": round(self.steady / GIB, 2),
            "fits": self.ram_bytes is None or self.need <= self.ram_bytes,
            "ray_nodes": self.ray_nodes,
            "head": self.head,
            "ray_processes_gb": round(self.fixed / GIB, 2),
            "shared_gb": {name: round(b / GIB, 2) for name, b in self.shared.items()},
            "replicas": [{"what": what, **estimate.terms()} for what, estimate in self.replicas],
            "left_out": [{"card": card, "why": why} for card, why in self.left_out],
            "changed": list(self.changed),
        }


def plan_hosts(cards: list, profiles: dict, stage_cards: tuple[str, ...] = (), stage: Profile | None = None,
               host_ram: dict[str, int | None] | None = None, head_host: str | None = None,
               calibration: Calibration | None = None, head_stage_replicas: int = 0
               ) -> tuple[dict[str, HostNeed], dict[str, str]]:
    """Each host's need for `cards` (GpuSnapshots of known tiers; `profiles` by tier, as the tiers run them), and the
    cards whose replicas their host cannot hold: ({host: HostNeed}, {card uuid: why}).

    Algorithm: the text-encoder stage's cards first (it serves every tier), then the fastest cards (`speed`), then
    the largest; each card's replicas (one per slot) on its own Ray node, the stage's beside them; a card whose
    replicas would take the host's need above its RAM (`host_ram`, None or absent: not checked) is refused and the
    next card is tried. The head's processes count on `head_host` (where `zit up` runs), and so do
    `head_stage_replicas` replicas of a stage on the head's CPU (`stage` their profile), before any card.
    """
    cal = calibration or load_calibration()
    host_ram = host_ram or {}
    needs: dict[str, HostNeed] = {}
    refused: dict[str, str] = {}
    if head_host is not None:
        needs[head_host] = HostNeed(head_host, host_ram.get(head_host), head=True, calibration=cal)
        for i in range(head_stage_replicas if stage is not None else 0):
            needs[head_host] = needs[head_host].with_replica(f"text-encoder stage on the CPU #{i + 1}",
                                                             encoder_host(stage, cal, cuda=False), ray_node=False)
    # The stage's cards first (it serves every tier), then the fastest cards, then the largest: when RAM runs out,
    # the cards left out are those that serve the least.
    ordered = sorted(cards, key=lambda c: (c.uuid not in stage_cards, -(c.speed or 0), -c.memory_total))
    for card in ordered:
        host = card.host or "localhost"
        need = needs.setdefault(host, HostNeed(host, host_ram.get(host), head=host == head_host, calibration=cal))
        cuda = True
        adds: list[tuple[str, HostEstimate, bool]] = []
        if card.uuid in stage_cards and stage is not None:
            adds.append(("text-encoder stage", encoder_host(stage, cal, cuda), False))
        for slot in range(card.slots):
            adds.append((f"{card.tier} on {card.name}" + (f" (slot {slot + 1})" if card.slots > 1 else ""),
                         replica_host(profiles[card.tier], cal, cuda), slot == 0))
        trial = need
        why = None
        for what, estimate, node in adds:
            why = trial.refusal(what, estimate, node)
            if why:
                break
            trial = trial.with_replica(what, estimate, node)
        if why:
            refused[card.uuid] = why
            need.left_out.append((f"{card.name} [{card.uuid}]", why))
        else:
            needs[host] = trial
    return needs, refused


_malloc_trim = None


def trim_host_memory() -> None:
    """Hand the process's free heap memory back to the host (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed blocks in its arenas, and after a large block is freed it raises its mmap threshold, so later
    large blocks (encoded images, decoded latents, the weights cache's shards) come from the arenas too. A replica's
    resident memory then stays at its largest transient, which hides a real leak and holds host RAM that the
    host's other replicas need.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
