"""One Ray node per card: how a host's cards join the cluster, and how a replica finds the card it runs on.

Each card becomes its own Ray node with `num_gpus=1`, a `vram_<tier>` resource and labels (card UUID, model, VRAM,
compute capability, bf16). A tier's Generator replicas ask for that tier's resource, so Serve can only place them on
cards of that tier, and a host with mixed cards never hands a replica the wrong one. A real card's node sees only
that card (CUDA_VISIBLE_DEVICES=<uuid>); a simulated card's node carries the fleet file in ZIT_FLEET_FILE.

A big card can instead be split (`--split CARD=TIER`): it then offers `vram_<TIER>: k`, k slots of a smaller tier
(as many as its memory holds at that tier's size), and hosts up to k replicas of that tier side by side, each with
a fraction of the GPU (the tier's `num_gpus` is 1/k, cluster/tiers.py) and the tier's memory budget. A split card
hosts only that tier: its own tier's replica would need the whole card.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cluster.nvml import ZIT_FLEET_FILE_ENV, FakeNvml, GpuSnapshot, LocalCard
from cluster.profiles import DTYPE_BYTES
from cluster.tiers import CLASSIFY_MARGIN, classify, tier_gib, tier_vram_bytes, vram_tiers
from runtime.local import RAY_HEAD_PORT

if TYPE_CHECKING:
    from cluster.stages import StagePlacement

LABEL_CARD = "zit/card"
LABEL_TIER = "zit/tier"
LABEL_MODEL = "zit/model"
LABEL_VRAM = "zit/vram-gb"
LABEL_CC = "zit/compute-capability"
LABEL_BF16 = "zit/bf16"
LABEL_SIMULATED = "zit/simulated"
LABEL_HOST = "zit/host"
LABEL_SLOTS = "zit/slots"
# The card nodes that host a text-encoder stage replica (cluster/stages.py) offer this resource, once; the stage's
# deployment asks for it, so Serve places it there and nowhere else.
TEXT_ENCODER_RESOURCE = "zit_text_encoder"
LABEL_TEXT_ENCODER = "zit/text-encoder"
# Set on card nodes that are Kubernetes pods (the chart's files/card-labels.py): KubeRay removes an idle one, so its
# dead node after a scale-down is no missing card.
LABEL_POD = "zit/pod"
# Logical CPUs each card's node offers: one for its Generator replica (one per slot on a split card), one for the odd
# Ray task beside it. Logical CPUs are scheduling slots, not cores; the replica's torch threads follow its own
# num_cpus.
CARD_NODE_CPUS = 2


def _slug(text: str) -> str:
    """A Ray label value: letters, digits, '-', '_', '.', at most 63 characters."""
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-")[:63] or "unknown"


@dataclass(frozen=True)
class CardNode:
    """The `ray start` settings that turn one card into one Ray node."""

    card: GpuSnapshot
    resources: dict[str, float]
    labels: dict[str, str]
    env: dict[str, str]

    @property
    def num_cpus(self) -> int:
        return CARD_NODE_CPUS - 1 + self.card.slots


def card_node(card: GpuSnapshot, fleet_file: str | Path | None = None, text_encoder: bool = False) -> CardNode:
    """Settings for a card of a known tier (`card.tier` must not be None); with `text_encoder`, the card also hosts
    a replica of the text-encoder stage."""
    if card.tier is None:
        raise ValueError(f"{card.name} ({card.memory_total / 2**30:.1f} GiB) is below the smallest tier")
    labels = {
        LABEL_CARD: card.uuid,
        LABEL_TIER: card.tier,
        LABEL_MODEL: _slug(card.name),
        LABEL_VRAM: f"{tier_gib(classify(card.memory_total) or card.tier):g}",  # the card's own class
        LABEL_SLOTS: str(card.slots),
        LABEL_CC: "{}.{}".format(*card.compute_capability),
        LABEL_BF16: "true" if card.bf16 else "false",
        LABEL_SIMULATED: "true" if card.simulated else "false",
    }
    if card.host:
        labels[LABEL_HOST] = _slug(card.host)
    if card.simulated:
        if fleet_file is None:
            raise ValueError("a simulated card needs its fleet file")
        env = {ZIT_FLEET_FILE_ENV: str(Path(fleet_file).resolve())}
    else:
        env = {"CUDA_VISIBLE_DEVICES": card.uuid}
    resources = {card.tier: float(card.slots)}
    if text_encoder:
        resources[TEXT_ENCODER_RESOURCE] = 1.0
        labels[LABEL_TEXT_ENCODER] = "true"
    return CardNode(card, resources, labels, env)


def with_default_port(address: str, port: int = RAY_HEAD_PORT) -> str:
    """`address` with Ray's GCS port when it names none ('head' -> 'head:6379', '[fd00::1]' -> '[fd00::1]:6379'); one
    with a port ('head:7000', '[fd00::1]:7000') stays as it is. `ray start --address` refuses a bare host, and a
    bare IPv6 address (colons, no brackets) cannot carry a port, so it is bracketed."""
    address = address.strip()
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{port}"
    if address.count(":") == 1:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def cards_to_join(nodes: list[CardNode], present: dict[str, dict[str, str]]
                  ) -> tuple[list[CardNode], list[str], list[str]]:
    """(the nodes whose card is not in the cluster yet, a line for each card that already is as it would join now,
    a warning for each that joined differently). `present` maps the card UUID of every live card node to its labels
    (`joined_cards`). A card joined earlier keeps the resources it joined with, so when its tier or slots differ
    from what it would join as now, its warning says to `zit down` first."""
    missing, already, warnings = [], [], []
    for node in nodes:
        joined = present.get(node.card.uuid)
        if joined is None:
            missing.append(node)
        elif (joined.get(LABEL_TIER), joined.get(LABEL_SLOTS, "1")) != (node.card.tier, str(node.card.slots)):
            warnings.append(f"warning: {node.card.name} [{node.card.uuid}] joined earlier as {joined.get(LABEL_TIER)} "
                            f"x {joined.get(LABEL_SLOTS, '1')}; `zit down` first to serve it as {node.card.tier} x "
                            f"{node.card.slots}")
        elif joined.get(LABEL_TEXT_ENCODER, "false") != node.labels.get(LABEL_TEXT_ENCODER, "false"):
            hosts = node.labels.get(LABEL_TEXT_ENCODER) == "true"
            warnings.append(f"warning: {node.card.name} [{node.card.uuid}] joined earlier "
                            f"{'without' if hosts else 'with'} the text-encoder stage; `zit down` first to "
                            f"{'host' if hosts else 'drop'} it there")
        else:
            already.append(f"{node.card.name} [{node.card.uuid}] is already in the cluster as a {node.card.tier} node")
    return missing, already, warnings


def joined_cards(address: str) -> dict[str, dict[str, str]]:
    """Labels of every live card node of the cluster at `address` (HOST:PORT), by card UUID, read from the GCS's
    node table as `ray status --address` does, without joining the cluster or starting a driver. Raises whatever
    Ray raises when the GCS cannot be reached or read."""
    from runtime.local import ensure_auth_mode

    ensure_auth_mode()  # before Ray's client reads its settings from the environment
    from ray._raylet import GcsClient
    from ray.core.generated import gcs_pb2

    nodes = GcsClient(address=address).get_all_node_info(timeout=30)
    return {
        info.labels[LABEL_CARD]: dict(info.labels)
        for info in nodes.values()
        if info.state == gcs_pb2.GcsNodeInfo.ALIVE and LABEL_CARD in info.labels
    }


# The environment variable that gives a worker node's Serve HTTP proxy its own port (Serve's; the head keeps the
# service port).
WORKER_PROXY_PORT_ENV = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"


def start_card_nodes(address: str, nodes: list[CardNode], node_ip: str | None = None,
                     proxy_port_from: int | None = None) -> list[str]:
    """`ray start --address` once per card, one after another. Returns one line per card saying what joined.
    `proxy_port_from`: the Serve proxy of the i-th node (when it hosts a replica) listens on that port + i; None:
    on the service's port, shared with every proxy on the machine (SO_REUSEPORT: the kernel spreads connections)."""
    import json

    from runtime.local import ensure_auth_mode, ensure_ray_process_env, ray_executable

    ensure_auth_mode()
    ensure_ray_process_env()

    def start(node: CardNode, proxy_port: int | None) -> str:
        env = {**os.environ, **node.env}
        if proxy_port is not None:
            env[WORKER_PROXY_PORT_ENV] = str(proxy_port)
        cmd = [
            ray_executable(), "start", f"--address={address}", "--num-gpus=1", f"--num-cpus={node.num_cpus}",
            f"--resources={json.dumps(node.resources)}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in node.labels.items()),
            "--disable-usage-stats",
        ]
        if node_ip:
            cmd.append(f"--node-ip-address={node_ip}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"card {node.card.name} ({node.card.uuid}) could not join {address}:\n"
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
        slots = f" ({node.card.slots} slots)" if node.card.slots > 1 else ""
        proxy = f", HTTP proxy on port {proxy_port}" if proxy_port is not None else ""
        return f"{node.card.name} [{node.card.uuid}] joined as a {node.card.tier} node{slots}{proxy}"

    # One after another: raylets started together on one machine can pick the same free port and die with
    # "bind: Address already in use" (about 5 s per card).
    return [start(node, None if proxy_port_from is None else proxy_port_from + i) for i, node in enumerate(nodes)]


def room_problem(card: GpuSnapshot) -> str | None:
    """Why `card` cannot host a replica of its tier now, or None: NVML reads it, its tier is known, and what other
    processes leave of its memory holds the profile's resident memory."""
    if card.error:
        return f"failed ({card.error}); check it with nvidia-smi"
    if card.tier is None:
        return f"has {card.memory_total / 2**30:.1f} GiB, below the smallest tier"
    from cluster.memory import resident_bytes
    from cluster.profiles import default_profile

    need = resident_bytes(default_profile(card.tier, card.bf16)) * card.slots
    left = card.memory_total - card.foreign_memory
    if left < need:
        what = f"{card.slots} {card.tier} replicas keep" if card.slots > 1 else f"a {card.tier} replica keeps"
        return (f"is shared: other processes hold {card.foreign_memory / 2**30:.1f} GiB, leaving {left / 2**30:.1f} "
                f"GiB; {what} {need / 2**30:.1f} GiB there")
    return None


def split_card(card: GpuSnapshot, tier: str) -> GpuSnapshot:
    """`card` as k slots of the smaller `tier`: k = how many cards of that tier its memory makes (with the same
    margin that classifies cards, so a 24 GB card makes two 12 GB slots or three 8 GB ones). Raises ValueError
    saying why when the split is not possible."""
    import dataclasses

    table = vram_tiers()
    if tier not in table:
        raise ValueError(f"unknown tier {tier!r}; tiers are {', '.join(table)}")
    if card.error:
        raise ValueError(f"card {card.index} ({card.name}) cannot be split: {card.error}")
    own = classify(card.memory_total, table)
    if own is None or table[tier] >= table[own]:
        raise ValueError(f"{card.name} is a {own or 'sub-tier'} card; it can only be split into a smaller tier "
                         f"than its own (got {tier})")
    slots = int(card.memory_total // (tier_vram_bytes(tier) * (1 - CLASSIFY_MARGIN)))
    if slots < 2:
        raise ValueError(f"{card.name} ({card.memory_total / 2**30:.1f} GiB) holds only one {tier} slot; splitting "
                         "it gains nothing")
    return dataclasses.replace(card, tier=tier, slots=slots)


def apply_splits(cards: list[GpuSnapshot], specs: list[str] | None) -> list[GpuSnapshot]:
    """Cards with the operator's splits applied. Each spec is CARD=TIER, CARD being a card's index (digits only), its
    UUID, or else a part of its name (`"RTX 4090=vram_12"`: every RTX 4090 becomes two vram_12 slots). A spec that
    matches no card, and a card that two specs match, are errors, so a typo neither leaves a card whole nor splits
    it twice."""
    cards = list(cards)
    split_by: dict[int, str] = {}
    for spec in specs or []:
        match, sep, tier = spec.rpartition("=")
        match = match.strip()
        if not sep or not match:
            raise ValueError(f"--split {spec!r}: write CARD=TIER, e.g. 'RTX 4090=vram_12'")
        if match.isdigit():
            hits = [i for i, c in enumerate(cards) if c.index == int(match)]
        else:
            hits = [i for i, c in enumerate(cards) if c.uuid == match] or \
                [i for i, c in enumerate(cards) if match.lower() in c.name.lower()]
        if not hits:
            raise ValueError(f"--split {spec!r}: no card matches {match!r} (cards: "
                             f"{', '.join(f'{c.index} {c.name}' for c in cards)})")
        for i in hits:
            if i in split_by:
                raise ValueError(f"--split {spec!r} and {split_by[i]!r} both match card {cards[i].index} "
                                 f"({cards[i].name}); give it one")
            split_by[i] = spec
            cards[i] = split_card(cards[i], tier.strip())
    return cards


def nodes_for_cards(cards: list[GpuSnapshot], fleet_file: str | Path | None,
                    text_encoder_cards: tuple[str, ...] = ()) -> tuple[list[CardNode], list[str]]:
    """Card nodes for every card that can host its replicas (one of its tier, or its slots when split), and a
    warning line for each that cannot (failed in NVML, too small, or too much of it held by other processes: a
    replica there would fail to load). The cards named in `text_encoder_cards` (uuids) also host the stage."""
    nodes, skipped = [], []
    for card in cards:
        problem = room_problem(card)
        if problem:
            skipped.append(f"{card.name} [{card.uuid or f'index {card.index}'}] {problem}: not joined")
        else:
            nodes.append(card_node(card, fleet_file, text_encoder=card.uuid in text_encoder_cards))
    return nodes, skipped


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (cgroup v2 `memory.max`, else v1 `memory.limit_in_bytes`), or None
    without one: inside a container (a Kubernetes pod) it, not the machine, is the RAM there is."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number
            return int(text)
        return None
    return None


def local_host_ram() -> dict[str, int]:
    """This host's RAM: 'total' (the machine's, or the cgroup's limit when lower) and 'available' (what the kernel
    could give now without swapping, within the cgroup's limit)."""
    import psutil

    memory = psutil.virtual_memory()
    total, available = memory.total, memory.available
    limit = cgroup_memory_limit()
    if limit is not None and limit < total:
        used = 0
        for path in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):  # v2, v1
            try:
                used = int(Path(path).read_text().strip())
                break
            except (OSError, ValueError):
                continue
        total, available = limit, min(available, max(0, limit - used))
    return {"total": total, "available": available}


def host_ram_of(cards: list[GpuSnapshot], fleet_file: str | Path | None, running: bool = False
                ) -> tuple[dict[str, int | None], str]:
    """(host RAM by host name, the head's host) for planning `cards`: a fleet file's `host_ram_gb` (hosts it does not
    list are not checked) with the head on its first card's host; for real cards this host's RAM available now, or
    its total when a cluster already `running` here holds part of it."""
    if fleet_file is not None:
        from cluster.nvml import load_fleet_file

        return dict(load_fleet_file(fleet_file).host_ram_bytes()), (cards[0].host if cards else None) or "localhost"
    ram = local_host_ram()
    return {"localhost": ram["total"] if running else ram["available"]}, "localhost"


class CardPlan(NamedTuple):
    """What `zit up` starts for a set of cards (`plan_card_nodes`)."""

    nodes: list[CardNode]  # the card nodes to start
    skipped: list[str]  # a line for each card that cannot serve, and why
    tiers: list  # the tiers (TierConfig) with their settings
    placement: "StagePlacement"  # the text-encoder stage's
    hosts: dict  # host name -> cluster.host_memory.HostNeed: what its replicas need in host RAM, and what it has


def plan_card_nodes(cards: list[GpuSnapshot], fleet_file: str | Path | None, configured: list | None = None,
                    stage: str = "auto", stage_replicas: int = 1, lora_params: int = 0,
                    host_ram: dict[str, int | None] | None = None, head_host: str | None = None) -> CardPlan:
    """What `zit up` (and an in-process simulated fleet) starts for `cards`: the card nodes, a line for each card
    that cannot serve, the tiers with their settings from `configured`, the text-encoder stage's placement (the cards
    that host it offer its resource) and each host's need in host RAM. A card whose host's RAM (`host_ram`, by host
    name; a fleet file's `host_ram_gb`) would not hold its replicas beside those placed before it is not joined, and
    its line says why (cluster/host_memory.py plan_hosts); the tiers and the stage are then planned without it.
    The head's processes count on `head_host`."""
    from cluster.host_memory import HostNeed, plan_hosts
    from cluster.profiles import tier_profile
    from cluster.stages import place_text_encoder, staged_tiers
    from cluster.tiers import tiers_for_cards

    nodes, skipped = nodes_for_cards(cards, fleet_file)
    usable = [node.card for node in nodes]

    # tier -> why its transformer is stored in 8 bits: for its slowest card's link, or for the hosts' RAM
    _, eight_bit = for_links(tiers_for_cards(usable, configured), configured, lora_params)
    tried: set[str] = set(eight_bit)  # tiers whose switch to 8 bits was tried

    def place(usable: list[GpuSnapshot], eight_bit: dict[str, str]):
        tiers = [stored_in_8_bits(t) if t.name in eight_bit else t for t in tiers_for_cards(usable, configured)]
        placement = place_text_encoder(usable, tiers, {t.name: tier_profile(t, lora_params) for t in tiers}, stage,
                                       stage_replicas)
        staged = staged_tiers(tiers, placement.where, list(placement.tiers), placement.reserve_bytes)
        on_head = stage_replicas if placement.where == "cpu" else 0  # a stage on the head's CPU
        hosts, refused = plan_hosts(usable, {t.name: tier_profile(t, lora_params) for t in staged},
                                    placement.cards, placement.profile, host_ram, head_host,
                                    head_stage_replicas=on_head)
        return tiers, placement, hosts, refused

    tiers, placement, hosts, refused = place(usable, eight_bit)
    left_out: dict[str, list] = {}
    # Before leaving a card out, its host's 16-bit streamed transformers go to 8 bits (one copy, half the size,
    # shared with the 8-bit tiers). Leaving cards out can move the stage or change a tier's profile: plan again
    # until every card left holds.
    while refused:
        switch = [name for name in ram_tight_tiers(usable, refused, {t.name: tier_profile(t, lora_params)
                                                                      for t in tiers}, configured)
                  if name not in tried]
        if switch:
            tried.update(switch)
            trial = dict(eight_bit)
            for name in switch:
                hosts_of = {c.host or "localhost" for c in usable if c.tier == name}
                why = next(refused[c.uuid] for c in sorted(usable, key=lambda c: c.tier != name)
                           if c.uuid in refused and (c.host or "localhost") in hosts_of)
                trial[name] = (f"{name}: transformer stored in {EIGHT_BIT} (the 8-bit tiers' copy) for host RAM; "
                               f"in 16 bits, {why}")
            planned = place(usable, trial)
            if len(planned[3]) < len(refused):  # kept only when it lets more cards join
                eight_bit.clear()
                eight_bit.update(trial)
                tiers, placement, hosts, refused = planned
            continue
        skipped += [f"{c.name} [{c.uuid}] {refused[c.uuid]}: not joined" for c in usable if c.uuid in refused]
        for name, need in hosts.items():
            left_out.setdefault(name, []).extend(need.left_out)
        usable = [c for c in usable if c.uuid not in refused]
        tiers, placement, hosts, refused = place(usable, eight_bit)
    for name, lines in left_out.items():  # what each host's plan left out, and why
        hosts.setdefault(name, HostNeed(name, (host_ram or {}).get(name), head=name == head_host)).left_out[:0] = lines
    for name, why in eight_bit.items():  # said with the hosts that hold the tier's cards
        for host in sorted({c.host or "localhost" for c in usable if c.tier == name}):
            if host in hosts:
                hosts[host].changed.append(why)
    kept = {c.uuid for c in usable}
    nodes = [card_node(node.card, fleet_file, text_encoder=node.card.uuid in placement.cards)
             for node in nodes if node.card.uuid in kept]
    return CardPlan(nodes, skipped, tiers, placement, hosts)


EIGHT_BIT = "float8_e4m3fn"
STREAMED = ("group_offload_block", "group_offload_leaf", "model_cpu_offload", "sequential_cpu_offload")
# A tier streaming a 16-bit transformer goes to 8 bits for its slowest card's link when that makes the card's step
# at least this much faster: on an x1 riser (0.79 GB/s) a step of the 4 and 6 GB tiers drops from 15.6 s to 7.8 s;
# on a x16 slot the step is compute-bound and nothing changes.
LINK_SWITCH_GAIN = 1.5


def for_links(tiers: list, configured: list | None = None, lora_params: int = 0) -> tuple[list, dict[str, str]]:
    """(`tiers` as `zit up` plans them for their cards' links: those `link_bound_tiers` names stored in 8 bits, and
    why each was)."""
    from cluster.profiles import tier_profile

    why = link_bound_tiers(tiers, {t.name: tier_profile(t, lora_params) for t in tiers}, configured)
    return [stored_in_8_bits(t) if t.name in why else t for t in tiers], why


def link_bound_tiers(tiers: list, profiles: dict, configured: list | None = None) -> dict[str, str]:
    """{tier: why} for the tiers to store in 8 bits for their links: those that stream a 16-bit transformer every
    step (group or sequential offload) where the tier's slowest card link (TierConfig.link_bytes_s) makes a reference
    step (cluster.speed.reference_step_s) at least LINK_SWITCH_GAIN x slower than in 8 bits, unless the service's
    config sets their storage or ignores links. A tier has one profile, so its other cards run 8 bits too; where
    their links are good they are compute-bound and lose no speed (the images are those of the 8-bit tiers)."""
    from cluster.profiles import tier_profile
    from cluster.speed import reference_step_s
    from cluster.tiers import tier_link

    pinned = {t.name for t in configured or [] if "storage_dtype" in (t.profile or {})}
    why = {}
    for tier in tiers:
        profile = profiles.get(tier.name)
        if (profile is None or tier.name in pinned or tier.link_bytes_s is None or not tier.link_aware
                or profile.weights not in STREAMED or DTYPE_BYTES[profile.transformer_storage] < 2):
            continue
        link = tier_link(tier)
        now = reference_step_s(profile, tier.speed, link)
        lighter = reference_step_s(tier_profile(stored_in_8_bits(tier), profile.lora_params), tier.speed, link)
        if now >= LINK_SWITCH_GAIN * lighter:
            why[tier.name] = (f"{tier.name}: transformer stored in {EIGHT_BIT} for its slowest card's link, "
                              f"{link.describe()}: a 1024x1024 step streams in {lighter:.1f} s instead of "
                              f"{now:.1f} s in 16 bits")
    return why


def stored_in_8_bits(tier):
    """`tier` (a TierConfig) with its transformer stored in 8 bits, as planning switches it for a host's RAM."""
    return tier.model_copy(update={"profile": {**(tier.profile or {}), "storage_dtype": EIGHT_BIT}})


def ram_tight_tiers(cards: list[GpuSnapshot], refused: dict[str, str], profiles: dict, configured: list | None
                    ) -> list[str]:
    """The tiers to store in 8 bits before leaving out the `refused` cards (uuid -> why): those with cards on the
    refused cards' hosts that stream a 16-bit transformer from host memory (a resident one keeps nothing there),
    unless the service's config sets their storage. Their 8-bit copy is the one vram_8 maps already (cast through
    bfloat16, cluster/weights.py), so a host holds one transformer for all of them, at half the bytes; the images
    are those of the 8-bit tiers (fp8 weights upcast per layer, docs/memory.md). Offloading without streams and
    model CPU offload hold private copies instead of mapping the shared one: 8 bits still halve them. A tier is one
    deployment, so its cards on other hosts run the 8-bit copy too; `plan_card_nodes` keeps a switch only when it
    lets more cards join."""
    hosts = {c.host or "localhost" for c in cards if c.uuid in refused}
    pinned = {t.name for t in configured or [] if "storage_dtype" in (t.profile or {})}
    return sorted({c.tier for c in cards if (c.host or "localhost") in hosts and c.tier in profiles
                   and c.tier not in pinned and profiles[c.tier].weights in STREAMED
                   and DTYPE_BYTES[profiles[c.tier].transformer_storage] >= 2})


# -- inside a replica ---------------------------------------------------------------------------------------------


def local_card() -> LocalCard | None:
    """The card of the Ray node this process runs on (from its `zit/card` label), or None on a CPU node."""
    import ray

    labels = ray.get_runtime_context().get_node_labels()
    card_uuid = labels.get(LABEL_CARD)
    if not card_uuid:
        return None
    if labels.get(LABEL_SIMULATED) == "true":
        fleet_file = os.environ.get(ZIT_FLEET_FILE_ENV)
        if not fleet_file:
            raise RuntimeError(f"node of simulated card {card_uuid} has no {ZIT_FLEET_FILE_ENV}; start it with zit")
        nvml = FakeNvml(fleet_file)
        simulated = True
    else:
        import pynvml as nvml

        simulated = False
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByUUID(card_uuid)
    index = nvml.nvmlDeviceGetIndex(handle) if not simulated else handle.index
    return LocalCard(card_uuid, index, nvml, simulated)
