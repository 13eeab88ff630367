"""One Ray node per card: how a host's cards join the cluster, and how a replica finds the card it runs on.

Each card becomes its own Ray node with `num_gpus=1`, a `vram_<tier>` resource and labels (card UUID, model, VRAM,
compute capability, bf16). A tier's Generator replicas ask for that tier's resource, so Serve can only place them on
cards of that tier, and a host with mixed cards never hands a replica the wrong one. A real card's node sees only
that card (CUDA_VISIBLE_DEVICES=<uuid>); a simulated card's node carries the fleet file in ZIT_FLEET_FILE.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cluster.nvml import ZIT_FLEET_FILE_ENV, FakeNvml, GpuSnapshot, read_card
from cluster.tiers import VRAM_TIERS_GIB

LABEL_CARD = "zit/card"
LABEL_TIER = "zit/tier"
LABEL_MODEL = "zit/model"
LABEL_VRAM = "zit/vram-gb"
LABEL_CC = "zit/compute-capability"
LABEL_BF16 = "zit/bf16"
LABEL_SIMULATED = "zit/simulated"
LABEL_HOST = "zit/host"
# Logical CPUs each card's node offers: one for its Generator replica, one for the odd Ray task beside it. Logical
# CPUs are scheduling slots, not cores; the replica's torch threads follow its own num_cpus.
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


def card_node(card: GpuSnapshot, fleet_file: str | Path | None = None) -> CardNode:
    """Settings for a card of a known tier (`card.tier` must not be None)."""
    if card.tier is None:
        raise ValueError(f"{card.name} ({card.memory_total / 2**30:.1f} GiB) is below the smallest tier")
    labels = {
        LABEL_CARD: card.uuid,
        LABEL_TIER: card.tier,
        LABEL_MODEL: _slug(card.name),
        LABEL_VRAM: f"{VRAM_TIERS_GIB[card.tier]:g}",
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
    return CardNode(card, {card.tier: 1.0}, labels, env)


def start_card_nodes(
    address: str, nodes: list[CardNode], node_ip: str | None = None, num_cpus: int = CARD_NODE_CPUS
) -> list[str]:
    """`ray start --address` once per card, one after another. Returns one line per card saying what joined."""
    import json

    from cluster.local import ensure_auth_mode, ray_executable

    ensure_auth_mode()

    def start(node: CardNode) -> str:
        cmd = [
            ray_executable(), "start", f"--address={address}", "--num-gpus=1", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(node.resources)}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in node.labels.items()),
            "--disable-usage-stats",
        ]
        if node_ip:
            cmd.append(f"--node-ip-address={node_ip}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **node.env}, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"card {node.card.name} ({node.card.uuid}) could not join {address}:\n"
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
        return f"{node.card.name} [{node.card.uuid}] joined as a {node.card.tier} node"

    # One after another: raylets started together on one machine can pick the same free port and die with
    # "bind: Address already in use" (about 5 s per card).
    return [start(node) for node in nodes]


def room_problem(card: GpuSnapshot) -> str | None:
    """Why `card` cannot host a replica of its tier now, or None: its tier is known and what other processes leave
    of its memory holds the profile's resident memory."""
    if card.tier is None:
        return f"has {card.memory_total / 2**30:.1f} GiB, below the smallest tier"
    from cluster.memory import resident_bytes
    from cluster.profiles import default_profile

    need = resident_bytes(default_profile(card.tier, card.bf16))
    left = card.memory_total - card.foreign_memory
    if left < need:
        return (f"is shared: other processes hold {card.foreign_memory / 2**30:.1f} GiB, leaving {left / 2**30:.1f} "
                f"GiB; a {card.tier} replica keeps {need / 2**30:.1f} GiB there")
    return None


def nodes_for_cards(cards: list[GpuSnapshot], fleet_file: str | Path | None) -> tuple[list[CardNode], list[str]]:
    """Card nodes for every card that can host a replica of its tier, and a warning line for each that cannot (too
    small, or too much of it held by other processes: a replica there would fail to load)."""
    nodes, skipped = [], []
    for card in cards:
        problem = room_problem(card)
        if problem:
            skipped.append(f"{card.name} [{card.uuid}] {problem}: not joined")
        else:
            nodes.append(card_node(card, fleet_file))
    return nodes, skipped


# -- inside a replica ---------------------------------------------------------------------------------------------


@dataclass
class LocalCard:
    """The card a replica runs on, with the NVML backend that reads it."""

    uuid: str
    index: int
    nvml: object
    simulated: bool

    def read(self) -> GpuSnapshot:
        return read_card(self.nvml, self.index, frozenset({os.getpid()}))


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
