"""A simulated fleet as a real multi-node Ray cluster in this process: a head plus one Ray node per card.

Each card node gets exactly what `zit up --fleet` gives it (cluster.node.card_node: num_gpus=1, its vram_<tier>
resource, labels, ZIT_FLEET_FILE), through ray.cluster_utils.Cluster instead of `ray start`, so tests can start and
stop it without ending other Ray processes. Module-scoped: one cluster per test module.
"""

from __future__ import annotations

import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from cluster.node import nodes_for_cards
from cluster.nvml import ZIT_SIM_STATE_DIR_ENV, load_fleet
from cluster.tiers import tiers_for_cards
from deployments.config import ServiceConfig

FLEETS = Path(__file__).resolve().parents[2] / "cluster" / "fleets"
TEST_FLEETS = Path(__file__).resolve().parent / "fleets"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fleet_cluster(fleet_file: Path, env: dict[str, str] | None = None):
    """Yield (cards, port) with Ray and Serve running on one node per card of `fleet_file`; `env` for every node."""
    import os

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # A private driver-state folder: simulated memory held by earlier runs must not leak into this one.
    state = tempfile.mkdtemp(prefix="zit-sim-state-")
    os.environ[ZIT_SIM_STATE_DIR_ENV] = state
    env = {**(env or {}), ZIT_SIM_STATE_DIR_ENV: state}
    cards = load_fleet(fleet_file)
    nodes, _ = nodes_for_cards(cards, fleet_file)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "env_vars": env})
    for node in nodes:
        cluster.add_node(num_cpus=2, num_gpus=1, resources=node.resources, labels=node.labels,
                         env_vars={**node.env, **env})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield [n.card for n in nodes], port
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop(ZIT_SIM_STATE_DIR_ENV, None)


def deploy(cards, port: int, configured=None, **settings) -> str:
    """Deploy the service for these cards (replacing any running one) and return its URL."""
    from ray import serve

    from deployments.app import build_app

    config = ServiceConfig(tiers=tiers_for_cards(cards, configured), **settings)
    serve.run(build_app(config), name="zit", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def wait_for_replicas(url: str, count: int, timeout_s: float = 60) -> dict:
    """GET /v1/fleet until `count` replicas have reported."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
        if len(fleet["replicas"]) >= count or time.monotonic() > deadline:
            return fleet
        time.sleep(1)


@pytest.fixture(scope="module")
def mixed_fleet():
    with fleet_cluster(FLEETS / "mixed.yaml") as (cards, port):
        yield cards, port
