"""Autoscaling on a local simulated fleet: a tier that starts at zero replicas wakes on the first request, a burst
raises it towards one replica per card, and idleness takes it back to zero (autoscaling/serve_policy.py's
application-level FleetAutoscaler driving the policy of autoscaling/policy.py inside Ray Serve's controller). The
application is deployed as serve_config.yaml deploys it (deployments.app.deploy, what `zit up` does)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cluster.tiers import tiers_for_cards
from deployments.app import deploy
from deployments.config import AutoscalingSettings, ServiceConfig
from deployments.registry import ZIT_FLEET_REPORT_PERIOD_S
from runtime.simfleet import fleet_cluster
from tests.system.conftest import TEST_FLEETS

pytestmark = pytest.mark.system

DEPLOYMENT = "Generator_vram_12"
# Short timers so the test sees a whole cycle in about a minute; the policy is the production one.
SETTINGS = AutoscalingSettings(initial_replicas=0, idle_timeout_s=10, downscale_delay_s=4, target_wait_s=4,
                               cold_start_s=5, metrics_interval_s=1)
BODY = {"prompt": "a burst of foxes", "size": "512x512", "steps": 9}


def running_replicas() -> int:
    return replica_states().get("RUNNING", 0)


def replica_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["zit"].deployments[DEPLOYMENT].replica_states)


def raised_replicas() -> int:
    """Replicas the policy has asked for and Serve runs or starts: a new one takes 10-20 s to load here, so a burst
    may end before the second one runs; the decision shows at once."""
    states = replica_states()
    return states.get("RUNNING", 0) + states.get("STARTING", 0)


@pytest.fixture(scope="module")
def url():
    # One 512x512 image takes a simulated RTX 3060 about 1.7 s here (time scale 0.4): a burst is real work.
    with fleet_cluster(TEST_FLEETS / "autoscale.yaml", {"ZIT_SIM_TIME_SCALE": "0.4"}) as (cards, port):
        assert len(cards) == 3
        deploy(ServiceConfig(tiers=tiers_for_cards(cards), autoscaling=SETTINGS), "zit", "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"


def controller_log() -> str:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return "".join(path.read_text(errors="replace") for path in logs.glob("controller_*.log"))


def test_a_burst_raises_the_tier_from_zero_and_idleness_takes_it_back_to_zero(url):
    assert running_replicas() == 0  # initial_replicas 0: nothing runs before the first request
    # The application-level policy is the one in force (Serve says so when it registers it).
    assert "Using custom autoscaling policy 'autoscaling.serve_policy:FleetAutoscaler' for application 'zit'" \
        in controller_log()
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append((time.monotonic(), raised_replicas()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda i: httpx.post(f"{url}/v1/images/generations", json={**BODY, "seed": i},
                                                           timeout=180), range(12)))
    finally:
        stop.set()  # the watcher reads Serve's status: it must not outlive the cluster
        watcher.join()
    burst_s = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 12, [r.text[:200] for r in responses if r.status_code != 200]
    assert {c["tier"] for r in responses for c in r.json()["metadata"]["chunks"]} == {"vram_12"}
    peak = max(n for _, n in seen)
    print(f"burst of 12 images in {burst_s:.1f} s; replicas running or starting every 0.5 s: {[n for _, n in seen]}")
    assert peak >= 2, f"the burst of 12 images ({burst_s:.0f} s) never raised the tier above {peak} replica(s)"
    # Idle: back to zero after the idle timeout (plus a control period and a registry report).
    deadline = time.monotonic() + SETTINGS.idle_timeout_s + SETTINGS.downscale_delay_s + 40
    while time.monotonic() < deadline and raised_replicas() > 0:
        time.sleep(1)
    assert raised_replicas() == 0, replica_states()
    # Scaled down on purpose: the replicas said goodbye, so no card reads as down (ZitCardDown stays quiet) and
    # every card's node is up.
    time.sleep(2 * ZIT_FLEET_REPORT_PERIOD_S + 1)  # the ingress reads the registry every period
    cards = card_gauges(url)
    assert cards["zit_card_node_up"] and set(cards["zit_card_node_up"].values()) == {1.0}, cards
    assert 0.0 not in cards["zit_card_up"].values(), cards
    # And the next request wakes it again; its card reports again.
    again = httpx.post(f"{url}/v1/images/generations", json={**BODY, "seed": 99}, timeout=180)
    assert again.status_code == 200, again.text
    time.sleep(2 * ZIT_FLEET_REPORT_PERIOD_S + 1)
    woken = card_gauges(url)["zit_card_up"]
    assert woken and set(woken.values()) == {1.0}, woken


def card_gauges(url: str) -> dict[str, dict[str, float]]:
    """zit_card_up and zit_card_node_up from GET /metrics: series name -> card uuid -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {"zit_card_up": {}, "zit_card_node_up": {}}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name][sample.labels["card"]] = sample.value
    return out
