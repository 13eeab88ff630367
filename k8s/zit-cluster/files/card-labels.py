"""Write the card of this pod as Ray node labels (YAML) for `ray start --labels-file`.

A worker pod holds exactly one card (nvidia.com/gpu: 1). Generator replicas find their card by the node label
zit/card (its NVML UUID), which no template can know, so the pod reads it from NVML at start with the same code
`zit node` uses on bare metal (runtime/nodes.py), and writes the full label set. The tier comes from the worker
group (ZIT_TIER), not from classifying the card: the group's `vram_<tier>` resource and its labels must agree.
Exits non-zero with the reason when the pod sees no card, more than one, or a card NVML cannot read.
"""

import dataclasses
import os
import sys

import yaml

from cluster.nvml import FakeNvml, probe
from runtime.nodes import LABEL_POD, card_node

fleet_file = os.environ.get("ZIT_FLEET_FILE")  # a simulated card (tests); unset on real GPUs
cards = probe(FakeNvml(fleet_file) if fleet_file else None)
if len(cards) != 1:
    sys.exit(f"card-labels: this pod must see exactly one NVIDIA card (nvidia.com/gpu: 1); NVML sees {len(cards)}")
if cards[0].error:
    sys.exit(f"card-labels: NVML cannot read this pod's card ({cards[0].error}); the pod cannot serve")
card = dataclasses.replace(cards[0], tier=os.environ["ZIT_TIER"], host=os.environ.get("ZIT_NODE_NAME") or None)
# ZIT_TEXT_ENCODER: the chart's textEncoder.workerGroup is this pod's group (it offers the stage a slot).
labels = {**card_node(card, fleet_file, text_encoder=os.environ.get("ZIT_TEXT_ENCODER") == "true").labels,
          LABEL_POD: "true"}
with open(sys.argv[1], "w") as out:
    yaml.safe_dump(labels, out, default_flow_style=False)
print(f"card-labels: {card.name} [{card.uuid}] as {card.tier}: {labels}")
