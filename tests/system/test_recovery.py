"""Recovery on a fleet with faulty simulated cards: out of memory, black images, a replica dying mid-request, a
host without the RAM for a replica.

The cheapest tier that holds a request is always tried first here (ZIT_TIER_SLACK is huge), so each request lands
on the faulty card the test aims at; the service must still answer every request correctly and say what it retried.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from cluster.tiers import TierConfig
from tests.system.conftest import TEST_FLEETS, deploy, fleet_cluster, wait_for_replicas

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def faulty():
    env = {"ZIT_TIER_SLACK": "1000000", "ZIT_SIM_TIME_SCALE": "0.2"}
    with fleet_cluster(TEST_FLEETS / "faults.yaml", env) as (cards, port):
        # The 24 GB tier runs without VAE tiling, so a large image only fits there once the replica degrades.
        configured = [TierConfig(name="vram_24", profile={"vae_tiling": False, "vae_slicing": False})]
        url = deploy(cards, port, configured)
        wait_for_replicas(url, len(cards))
        yield cards, url


def generate(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red fox", "steps": 2, **body}, timeout=300)


def tiers_when(url: str, condition, timeout_s: float) -> dict:
    """GET /v1/fleet every 2 s until `condition(tiers by name)` holds or `timeout_s` passes; the last tiers read."""
    deadline = time.monotonic() + timeout_s
    while True:
        tiers = {t["name"]: t for t in httpx.get(f"{url}/v1/fleet", timeout=30).json()["tiers"]}
        if condition(tiers) or time.monotonic() > deadline:
            return tiers
        time.sleep(2)


def not_black(item: dict) -> bool:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))).max() > 2


def test_out_of_memory_moves_the_chunk_to_a_larger_tier(faulty):
    _, url = faulty
    response = generate(url, size="512x512", n=1, seed=5)
    assert response.status_code == 200, response.text
    meta = response.json()["metadata"]
    assert meta["retries"][0]["reason"] == "out_of_memory" and meta["retries"][0]["from"] == "vram_4"
    # The 6 GB card it moved to returns black images, so it moved again, to a card with bf16.
    assert meta["retries"][1] == {"seeds": [5], "reason": "bad_image", "from": "vram_6", "to": "vram_8"}
    assert meta["chunks"][0]["tier"] == "vram_8" and not_black(response.json()["data"][0])


def test_black_images_move_to_a_card_with_bf16(faulty):
    _, url = faulty
    response = generate(url, size="1408x1408", n=2, seed=40)  # above what the 4 GB card holds
    assert response.status_code == 200, response.text
    payload = response.json()
    assert [r["reason"] for r in payload["metadata"]["retries"]][:1] == ["bad_image"]
    assert all(c["tier"] in ("vram_8", "vram_24") for c in payload["metadata"]["chunks"])
    assert [item["seed"] for item in payload["data"]] == [40, 41] and all(map(not_black, payload["data"]))


def test_replica_degrades_on_its_own_card_before_giving_up(faulty):
    """Sent past the planner: 2048x2048 x2 without VAE tiling does not fit 24 GB; with tiles it does."""
    from ray import serve

    from cluster.requests import GenerationJob

    job = GenerationJob(prompt="x", width=2048, height=2048, steps=1, guidance_scale=0.0, seeds=[1, 2])
    # The generators hold no text encoder: the stage encodes the prompt, as the ingress has it do.
    encoded = serve.get_deployment_handle("TextEncoder", "zit").encode.remote("x", None, False).result()
    job = job.model_copy(update={"encoded": encoded.embeddings})
    result = serve.get_deployment_handle("Generator_vram_24", "zit").generate.remote(job).result()
    assert result.degraded and len(result.images) == 2


def test_a_replica_killed_mid_request_has_its_chunk_retried(faulty):
    import ray

    _, url = faulty
    outcome = {}

    def slow_request():
        # 1664x1664 is above the 6 GB card's largest: it runs on a 3070, for several seconds at this time scale.
        outcome["response"] = generate(url, size="1664x1664", n=1, seed=9, steps=4)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(2.0)
    replicas = [name for name in ray.util.list_named_actors(all_namespaces=True)
                if "Generator_vram_8" in name["name"]]
    assert len(replicas) == 2
    for actor in replicas:  # both: whichever holds the chunk dies
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    thread.join(timeout=240)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert "replica_died" in [r["reason"] for r in response.json()["metadata"]["retries"]]
    # Serve brings the replicas back: the fleet view shows both 3070s serving again.
    tiers = tiers_when(url, lambda tiers: tiers["vram_8"]["replicas_running"] == 2, 120)
    assert tiers["vram_8"]["replicas_running"] == 2


def test_a_text_encoder_stage_replica_killed_under_requests_is_retried(faulty):
    """Six requests with new prompts queue at the stage (one encode at a time) behind encodes sent to it directly;
    its replica is killed while they wait there: every request still ends with its images, the ones whose encode
    died retried on the replica Serve starts."""
    import ray
    from ray import serve

    from deployments.progress import get_progress_store

    _, url = faulty
    # One encode takes a few tens of ms here: 40 calls ahead hold the stage's lock for seconds, so the kill lands
    # while the six requests are queued at the replica (the stage takes up to 64 at once), however slow the machine.
    stage_handle = serve.get_deployment_handle("TextEncoder", "zit")
    ahead = [stage_handle.encode.remote(f"ahead of the requests {i}", None, True) for i in range(40)]
    store = get_progress_store()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(generate, url, prompt=f"a stage that dies, take {i}", guidance_scale=2.0,
                               size="256x256", n=1, seed=400 + i) for i in range(6)]
        deadline = time.monotonic() + 30
        while ((ray.get(store.current.remote()) or {}).get("running", 0) < 6 and time.monotonic() < deadline):
            time.sleep(0.05)  # the ingress files each request before it asks the stage
        time.sleep(0.2)
        stage = [a for a in ray.util.list_named_actors(all_namespaces=True) if "TextEncoder" in a["name"]]
        assert len(stage) == 1, stage
        ray.kill(ray.get_actor(stage[0]["name"], namespace=stage[0]["namespace"]), no_restart=False)
        responses = [f.result() for f in futures]
    for call in ahead:  # lost with the replica, or answered before it died
        try:
            call.result(timeout_s=60)
        except Exception:
            pass
    assert [r.status_code for r in responses] == [200] * 6, [r.text[:300] for r in responses]
    attempts = [r.json()["metadata"]["text_encoder"]["attempts"] for r in responses]
    assert max(attempts) >= 2, attempts  # some encode was lost with the replica and retried


def test_every_accepted_request_completes_under_faults(faulty):
    _, url = faulty
    sizes = ["512x512", "1024x1024", "1408x1408", "768x768", "512x512", "1664x1664"]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda s: generate(url, size=s, n=2, seed=100), sizes))
    assert [r.status_code for r in responses] == [200] * len(sizes), [r.text[:300] for r in responses]
    assert all(len(r.json()["data"]) == 2 and all(map(not_black, r.json()["data"])) for r in responses)


def test_a_card_node_dying_under_load_loses_nothing_and_the_card_rejoins(faulty):
    """Kill the Ray node of one RTX 3070 while requests run on that tier: every request completes (its chunk moves
    to the other 3070 or a larger tier); when the card's node comes back, Serve places its replica again."""
    from runtime.simfleet import add_card_node, remove_card_node

    cards, url = faulty
    victim = [c for c in cards if c.tier == "vram_8"][0]
    sizes = ["1664x1664"] * 4  # above what the 4 and 6 GB cards hold: the 3070s and the 4090 take these
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, url, size=s, n=1, seed=300 + i, steps=4) for i, s in enumerate(sizes)]
        time.sleep(1.5)
        remove_card_node(victim.uuid)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 4, [r.text[:300] for r in responses]
    add_card_node(victim.uuid)
    tiers = tiers_when(url, lambda tiers: tiers["vram_8"]["replicas_running"] == 2, 180)
    assert tiers["vram_8"]["replicas_running"] == 2, tiers


def test_a_card_whose_nvml_fails_is_drained_and_comes_back(faulty):
    """NVML starts failing on the GTX 1650 (GPU is lost) in every process: nothing new is sent to it, requests are
    still served elsewhere; when NVML answers again, the card takes work again."""
    from cluster.nvml import FakeNvml

    cards, url = faulty
    card = next(c for c in cards if c.tier == "vram_4")
    nvml = FakeNvml(TEST_FLEETS / "faults.yaml")  # ZIT_SIM_STATE_DIR points at the cluster's driver state
    handle = next(h for h in nvml.cards if h.uuid == card.uuid)

    def wait_for(condition, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
            if condition(fleet):
                return fleet
            time.sleep(1)
        raise AssertionError(f"fleet never reached the expected state: {fleet['cards']}")

    def card_error(fleet):
        return next(c for c in fleet["cards"] if c["uuid"] == card.uuid)["error"]

    nvml.set_lost(handle, True)
    try:
        wait_for(lambda fleet: card_error(fleet))
        time.sleep(4.5)  # the ingress reads the reports every 2 s, the replicas send them every 2 s
        response = generate(url, size="512x512", n=1, seed=21)
        assert response.status_code == 200, response.text
        meta = response.json()["metadata"]
        assert "vram_4" not in [c["tier"] for c in meta["chunks"]] + [r["from"] for r in meta["retries"]]
    finally:
        nvml.set_lost(handle, False)
    wait_for(lambda fleet: not card_error(fleet))
    time.sleep(4.5)
    response = generate(url, size="512x512", n=1, seed=22)
    assert response.status_code == 200, response.text
    assert response.json()["metadata"]["retries"][0]["from"] == "vram_4"  # tried there first again


def test_a_replica_its_host_has_no_ram_for_fails_to_start_and_the_other_hosts_serve(faulty):
    """A program outside the cluster takes host-b's RAM; both RTX 3070 replicas there die and Serve starts them
    again: each fails to start with the host's "Cannot allocate memory" (the simulated host holds the real model's
    RAM), and a request the 3070s would take is served by the RTX 4090 on host-c. When the RAM is
    given back, the replicas start and take work again. (Last in this module: it leaves vram_8 down for a while.)"""
    import ray
    from ray import serve

    from cluster.nvml import FakeNvml
    from cluster.simcard import SimulatedHost
    from cluster.tiers import GIB

    _, url = faulty
    host = SimulatedHost(FakeNvml(TEST_FLEETS / "faults.yaml"), "host-b")
    host.set_other_use(host.ram_bytes - GIB)  # 1 GiB left: less than one replica's own runtime
    try:
        for actor in [a for a in ray.util.list_named_actors(all_namespaces=True) if "Generator_vram_8" in a["name"]]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
        deadline, message = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "Cannot allocate memory" not in message:
            time.sleep(2)
            deployments = serve.status().applications["zit"].deployments
            message = next((d.message for name, d in deployments.items() if "vram_8" in name), "")
        assert "Cannot allocate memory: simulated host host-b has 32.0 GiB of RAM" in message, message
        # The killed replicas' last reports age out of the registry (6 s); Serve's message for the tier is its
        # latest event: a killed replica's failed health check, or a restart that the host refused.
        tiers = tiers_when(url, lambda tiers: tiers["vram_8"]["replicas_running"] == 0
                           and "Cannot allocate memory" in (tiers["vram_8"]["start_error"] or ""), 90)
        assert tiers["vram_8"]["replicas_running"] == 0 and tiers["vram_24"]["replicas_running"] == 1, tiers
        assert tiers["vram_8"]["start_error"], tiers["vram_8"]  # the fleet view says why the tier is down
        assert tiers["vram_24"]["start_error"] is None
        response = generate(url, size="1664x1664", n=1, seed=500)  # above the 4 and 6 GB cards: a 3070's size
        assert response.status_code == 200, response.text
        assert [c["tier"] for c in response.json()["metadata"]["chunks"]] == ["vram_24"]
    finally:
        host.set_other_use(0)
    tiers = tiers_when(url, lambda tiers: tiers["vram_8"]["replicas_running"] == 2, 240)
    assert tiers["vram_8"]["replicas_running"] == 2, tiers["vram_8"]
    assert tiers["vram_8"]["start_error"] is None
    response = generate(url, size="1664x1664", n=1, seed=510)
    assert response.status_code == 200, response.text
