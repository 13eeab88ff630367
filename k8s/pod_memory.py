"""The chart's worker pod memory, from the host-memory model (cluster/host_memory.py), for every tier.

    make chart-memory                    # writes k8s/zit-cluster/files/pod-memory.json from the model
    python k8s/pod_memory.py --check     # exit 1 when the committed file differs from what the model gives

A worker pod is one card, one Ray node, `slots` Generator replicas, and in the group that hosts it a text-encoder
stage replica. Its memory request is what those keep by the model: the Ray node's processes, each replica's own
bytes (runtime, pinned staging), and each weight set it maps. The weight sets are counted whole in every pod:
pods of one node share them through the weights-cache hostPath volume, but the kernel charges a page of a shared
file to the cgroup that read it first, so any one pod may be charged all of it. The limit adds the load transient
(writing a missing stored copy: one shard). The chart's template (`zit.podMemory`) adds these up per group from
this file; a group that sets `resources.requests.memory` / `limits.memory` keeps its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages are beside k8s/
    sys.path.insert(0, str(ROOT))

from cluster.host_memory import CACHE_WRITE_BYTES, encoder_host, ray_node_bytes, replica_host  # noqa: E402
from cluster.memory import load_calibration  # noqa: E402
from cluster.profiles import default_profile  # noqa: E402
from cluster.stages import stage_profile  # noqa: E402
from cluster.tiers import VRAM_TIERS_GIB  # noqa: E402

OUT = ROOT / "k8s" / "zit-cluster" / "files" / "pod-memory.json"
MIB = 1 << 20


def _mib(n: float) -> int:
    return -(-int(n) // MIB)  # rounded up


def _entry(estimate) -> dict:
    return {"own_mib": _mib(estimate.runtime + estimate.private),
            "shared_mib": {name: _mib(size) for name, size in sorted(estimate.shared.items())}}


def build() -> str:
    """The file's JSON text: per tier, per bf16 ('bf16' / 'fp32'), per text encoder ('stage': the service runs the
    stage, 'local': every generator its own), a replica's own MiB and the weight sets it maps; the stage's replica
    per bf16 and placement ('gpu' / 'offload'); a Ray node's processes; the load transient."""
    cal = load_calibration()
    tiers = {}
    for tier in VRAM_TIERS_GIB:
        tiers[tier] = {}
        for bf16, key in ((True, "bf16"), (False, "fp32")):
            profile = default_profile(tier, bf16)
            staged = profile.model_copy(update={"text_encoder": "stage"})
            tiers[tier][key] = {"local": _entry(replica_host(profile, cal)), "stage": _entry(replica_host(staged, cal))}
    stage = {key: {weights: _entry(encoder_host(stage_profile(bf16, weights), cal)) for weights in ("gpu", "offload")}
             for bf16, key in ((True, "bf16"), (False, "fp32"))}
    data = {
        "_generated": "by k8s/pod_memory.py from cluster/host_memory.py and the shipped calibration; do not edit",
        "ray_node_mib": _mib(ray_node_bytes(cal)),
        "load_transient_mib": _mib(CACHE_WRITE_BYTES),
        "tiers": tiers,
        "stage": stage,
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the committed file differs")
    args = parser.parse_args(argv)
    text = build()
    if OUT.exists() and OUT.read_text() == text:
        return 0
    if args.check:
        print(f"differs from k8s/pod_memory.py: {OUT}\nrun `make chart-memory` and commit the result")
        return 1
    OUT.write_text(text)
    print(f"wrote: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
