"""A simulated fleet as a real multi-node Ray cluster in this process, one node per card of a fleet file, with Serve
started on it: what the system tests and the benchmarks run on. Fault tests remove, kill and restore card nodes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from runtime.local import HEAD_RESOURCES, ensure_ray_process_env, free_port

# The in-process fleet clusters running now (Cluster, card uuid -> CardNode, node env): fault tests remove a card's
# node and add it back through these.
ACTIVE_FLEET_CLUSTERS: list = []
# Their text-encoder stage placements (cluster.stages.StagePlacement), in the same order.
STAGE_PLACEMENTS: list = []


def remove_card_node(card_uuid: str) -> None:
    """Kill the Ray node of one card of the running in-process fleet cluster (a host losing a card, or dying)."""
    cluster, _, _ = ACTIVE_FLEET_CLUSTERS[-1]
    for node in cluster.list_all_nodes():
        if node.node_labels.get("zit/card") == card_uuid:
            cluster.remove_node(node)
            return
    raise LookupError(f"no node for card {card_uuid}")


def kill_card_raylet(card_uuid: str) -> None:
    """SIGKILL the raylet of one card's node of the running in-process fleet cluster, as a host that loses the card
    or its power does: no goodbye, Ray notices by its health checks. The node's workers exit with it."""
    cluster, _, _ = ACTIVE_FLEET_CLUSTERS[-1]
    for node in cluster.list_all_nodes():
        if node.node_labels.get("zit/card") == card_uuid:
            node.kill_raylet()  # SIGKILL, not SIGTERM
            return
    raise LookupError(f"no node for card {card_uuid}")


def add_card_node(card_uuid: str) -> None:
    """Start the Ray node of one card of the running in-process fleet cluster again (the card is back)."""
    cluster, nodes, env = ACTIVE_FLEET_CLUSTERS[-1]
    node = nodes[card_uuid]
    cluster.add_node(num_cpus=node.num_cpus, num_gpus=1, resources=node.resources, labels=node.labels,
                     env_vars={**node.env, **env})


def active_stage():
    """Where the running in-process fleet cluster placed the text-encoder stage (cluster.stages.StagePlacement):
    the service deployed on it must be configured with this placement (its card nodes offer its resource)."""
    return STAGE_PLACEMENTS[-1]


@contextmanager
def fleet_cluster(fleet_file: Path, env: dict[str, str] | None = None, splits: list[str] | None = None,
                  text_encoder: str = "auto"):
    """Yield (cards, port) with Ray and Serve running in this process on one node per card of `fleet_file`.

    Each card node gets what `zit up --fleet` gives it (runtime.nodes.card_node: num_gpus=1, its vram_<tier>
    resource, labels, ZIT_FLEET_FILE), through ray.cluster_utils.Cluster instead of `ray start`, so tests and
    benchmarks start and stop it without ending other Ray processes. `env` is set on every node; `splits` are
    `zit up --split` specs (CARD=TIER); `text_encoder` is the stage's placement as `zit up` resolves it (the card
    nodes that host it offer its resource; `active_stage()` says where it went).
    """
    import tempfile

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.nvml import ZIT_SIM_STATE_DIR_ENV, load_fleet
    from runtime.nodes import apply_splits, host_ram_of, plan_card_nodes

    ensure_ray_process_env()
    # A private driver-state folder: simulated memory held by earlier runs must not leak into this one.
    state = tempfile.mkdtemp(prefix="zit-sim-state-")
    os.environ[ZIT_SIM_STATE_DIR_ENV] = state
    env = {**(env or {}), ZIT_SIM_STATE_DIR_ENV: state}
    cards = apply_splits(load_fleet(fleet_file), splits)
    host_ram, head_host = host_ram_of(cards, fleet_file)
    nodes, _, _, placement, _ = plan_card_nodes(cards, fleet_file, stage=text_encoder, host_ram=host_ram,
                                                head_host=head_host)
    STAGE_PLACEMENTS.append(placement)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "env_vars": env,
                                                           "resources": HEAD_RESOURCES})
    for node in nodes:
        cluster.add_node(num_cpus=node.num_cpus, num_gpus=1, resources=node.resources, labels=node.labels,
                         env_vars={**node.env, **env})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ACTIVE_FLEET_CLUSTERS.append((cluster, {node.card.uuid: node for node in nodes}, env))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        yield [node.card for node in nodes], port
    finally:
        ACTIVE_FLEET_CLUSTERS.pop()
        STAGE_PLACEMENTS.pop()
        # No serve.shutdown(): the whole cluster ends here, and Serve's graceful shutdown of every replica first took
        # 5 s. Serve drops a client left from an ended Ray session on the next serve.start().
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop(ZIT_SIM_STATE_DIR_ENV, None)
