"""Simulated fleets as real multi-node Ray clusters in the test process (runtime.simfleet.fleet_cluster), one per
test module, and the helpers to deploy the service on them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from cluster.tiers import tiers_for_cards
from deployments.config import ServiceConfig, TextEncoderSettings
from runtime.simfleet import active_stage, fleet_cluster

FLEETS = Path(__file__).resolve().parents[2] / "cluster" / "fleets"
TEST_FLEETS = Path(__file__).resolve().parent / "fleets"


def deploy(cards, port: int, configured=None, **settings) -> str:
    """Deploy the service for these cards (replacing any running one) and return its URL; the text-encoder stage
    where the fleet cluster placed it (as `zit up` does), unless `settings` say otherwise."""
    from ray import serve

    from deployments.app import build_app

    settings.setdefault("text_encoder", TextEncoderSettings().resolve(active_stage()))
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
