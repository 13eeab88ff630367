"""VRAM-aware routing on the simulated mixed fleet (five cards, five tiers) as a real multi-node Ray cluster.

The tiny model computes the pixels; every simulated card accounts memory as the real Z-Image-Turbo would need under
its tier's profile and raises CUDA's out-of-memory error when a chunk would not fit. So a routing mistake fails.
"""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from cluster.memory import predict_peak
from cluster.planning import fleet_tiers, plan
from cluster.profiles import default_profile, degraded_profile
from tests.system.conftest import FLEETS, deploy_once, tiny_lora_dir, wait_for_policy, wait_for_replicas

pytestmark = pytest.mark.system

# A mixed workload: sizes 512 to 2048, n 1 to 8. Two steps keep the tiny model's CPU time (quadratic attention at
# 2048x2048) small; the simulated cards' memory does not depend on steps.
WORKLOAD = [
    (512, 1), (512, 8), (768, 2), (1024, 1), (1024, 4), (1536, 1), (512, 4), (768, 1),
    (1024, 2), (2048, 1), (512, 2), (1536, 2), (768, 4), (1024, 8), (512, 1), (2048, 2),
]
STEPS = 2


def send_workload(url: str, concurrency: int = 8) -> list[tuple[dict, httpx.Response]]:
    def one(i_item):
        i, (side, n) = i_item
        body = {"prompt": f"workload {i}", "size": f"{side}x{side}", "n": n, "seed": 1000 * i, "steps": STEPS}
        return body, httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, enumerate(WORKLOAD)))


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


@pytest.fixture(scope="module")
def tier_aware(mixed_fleet):
    """The service zit up runs, with the tiny LoRA folder: the web UI's tests (test_webui.py) run on it next."""
    cards, port = mixed_fleet
    url = deploy_once(mixed_fleet, lora_dir=tiny_lora_dir())
    wait_for_policy(url, "tier_aware", "vram_aware")
    wait_for_replicas(url, len(cards))
    return cards, port, url


def test_mixed_workload_no_out_of_memory_nothing_lost_images_match(tier_aware):
    cards, port, url = tier_aware
    results = send_workload(url)
    for body, response in results:
        assert response.status_code == 200, (body, response.text)
        payload = response.json()
        side, n = int(body["size"].split("x")[0]), body["n"]
        # Every image there, the asked size, in seed order.
        assert [item["seed"] for item in payload["data"]] == list(range(body["seed"], body["seed"] + n))
        assert all(decode(item).size == (side, side) for item in payload["data"])
        chunks = payload["metadata"]["chunks"]
        assert sum(len(c["seeds"]) for c in chunks) == n
        # No chunk needed an out-of-memory retry, elsewhere or degraded on its own card: the planner and the router
        # only sent what fits.
        assert not [r for r in payload["metadata"]["retries"] if r["reason"] == "out_of_memory"], payload["metadata"]
        assert not [c for c in chunks if c["degraded"]], payload["metadata"]
    used = {c["tier"] for _, r in results for c in r.json()["metadata"]["chunks"]}
    assert len(used) >= 3, used  # the load spread over the fleet, not one card


def test_a_split_image_equals_the_same_seed_alone(tier_aware):
    _, _, url = tier_aware
    body = {"prompt": "a red fox", "size": "512x512", "n": 6, "seed": 77, "steps": STEPS}
    split = httpx.post(f"{url}/v1/images/generations", json=body, timeout=300).json()
    assert len(split["metadata"]["chunks"]) >= 2
    alone = httpx.post(f"{url}/v1/images/generations", json={**body, "n": 1, "seed": 80}, timeout=300).json()
    fourth = np.asarray(decode(split["data"][3]).convert("RGB")).astype(int)
    single = np.asarray(decode(alone["data"][0]).convert("RGB")).astype(int)
    assert np.abs(fourth - single).max() <= 1


def test_a_request_split_over_tiers_is_encoded_once_by_the_stage_and_a_repeat_not_at_all(tier_aware):
    """The text-encoder stage runs where `zit up` puts it on this fleet (the RTX 4090, group-offloaded): an n=8
    request cut into chunks on several tiers is encoded once, the same prompt again not at all (the stage's cache),
    and the fleet view says where the stage runs and what its cache holds."""
    cards, _, url = tier_aware
    body = {"prompt": "one encode for all of these", "size": "1024x1024", "n": 8, "seed": 5, "steps": STEPS}
    first = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    assert first.status_code == 200, first.text
    meta = first.json()["metadata"]
    assert len({c["tier"] for c in meta["chunks"]}) >= 2, meta["chunks"]
    assert meta["text_encoder"]["cached"] is False and meta["text_encoder"]["attempts"] == 1
    again = httpx.post(f"{url}/v1/images/generations", json={**body, "n": 2, "seed": 50}, timeout=600)
    assert again.status_code == 200 and again.json()["metadata"]["text_encoder"]["cached"] is True
    stage = httpx.get(f"{url}/v1/fleet", timeout=30).json()["text_encoder"]
    rtx4090 = next(c for c in cards if "4090" in c.name)
    assert (stage["where"], stage["cards"], stage["tiers"]) == ("card", [rtx4090.uuid], ["vram_24"])
    assert stage["replicas"] and stage["replicas"][0]["stage_card"]["uuid"] == rtx4090.uuid
    assert stage["replicas"][0]["cache"]["entries"] >= 1 and stage["replicas"][0]["cache"]["hits"] >= 1
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    hits = re.search(r'^zit_text_encoder_requests_total\{outcome="hit"\} (\S+)$', metrics, re.M)
    assert hits and float(hits.group(1)) >= 1


def test_the_fleet_view_shows_each_hosts_ram_and_what_its_replicas_need(tier_aware):
    """Every simulated host of mixed.yaml reports its RAM (32 GiB, from the fleet file), what its replicas hold of it
    by the host-memory model (the simulated host's accounting), and their need: within the RAM, as `zit plan`
    predicted; the RTX 4090's host also maps the stage's encoder."""
    from cluster.nvml import load_fleet_file

    _, _, url = tier_aware
    hosts = {h["host"]: h for h in httpx.get(f"{url}/v1/fleet", timeout=30).json()["hosts"]}
    given = load_fleet_file(FLEETS / "mixed.yaml").host_ram_gb
    assert set(hosts) == set(given)
    for name, host in hosts.items():
        assert host["simulated"] and host["ram_gib"] == given[name]
        assert 0 < host["need_gib"] <= host["ram_gib"] and host["used_gib"] == pytest.approx(host["need_gib"], abs=0.01)
    assert "text_encoder-leaves-bfloat16" in hosts["host-c"]["shared_gib"]
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    total = re.search(r'^zit_host_memory_total_bytes\{host="host-a"\} (\S+)$', metrics, re.M)
    assert total and float(total.group(1)) == 32 * 2**30


@pytest.mark.redeploys
def test_round_robin_and_rays_default_router_would_hit_out_of_memory(mixed_fleet):
    """The baseline: chunks rotated over the tiers without the memory model, Ray's default router, no retries. The
    simulated cards refuse what does not fit. One single-image request per tier, at a size the memory model says the
    smallest tier cannot hold even degraded, takes each tier once (in any order), so exactly that tier must refuse
    it. (How often a mixed workload hits such a card depends on the order threads take rotation slots; the routing
    benchmark, bench/fleet_routing.py, measures that.)"""
    cards, _ = mixed_fleet
    # Run after every test that shares the tier-aware service (marked `redeploys`): the baseline replaces it.
    url = deploy_once(mixed_fleet, tier_policy="round_robin", in_tier_router="ray_default")
    wait_for_policy(url, "round_robin", "ray_default")
    fleet = wait_for_replicas(url, len(cards))
    side = 1280
    tiers = [t["name"] for t in fleet["tiers"] if t["replicas_target"]]
    budgets = fleet_tiers(FLEETS / "mixed.yaml")
    too_small = {row["tier"] for row in plan(side, side, 1, STEPS, budgets) if not row["fits"]}
    assert too_small and too_small < set(tiers), too_small
    for tier in too_small:
        profile = default_profile(tier, budgets[tier][1])
        assert predict_peak(side, side, 1, degraded_profile(profile) or profile).total > budgets[tier][0]
    with ThreadPoolExecutor(len(tiers)) as pool:
        answers = list(pool.map(
            lambda i: httpx.post(f"{url}/v1/images/generations", timeout=600,
                                 json={"prompt": f"too big {i}", "size": f"{side}x{side}", "seed": i, "steps": STEPS}),
            range(len(tiers))))
    refused = {}
    for answer in answers:
        if answer.status_code != 200:
            assert answer.status_code == 503 and "out_of_memory" in answer.text, answer.text
            refused[re.search(r"last on (\w+)", answer.text).group(1)] = answer.json()
    print(f"round robin + default router: {len(refused)} of {len(answers)} requests hit out-of-memory")
    assert set(refused) == too_small, (refused, too_small)
    # So the cards refuse exactly what the memory model says they cannot hold, degraded retry included. The mixed
    # workload above, sent one request at a time through this rotation, would hit out-of-memory this often:
    would_fail = rotation_out_of_memory(tiers, budgets)
    print(f"the mixed workload ({len(WORKLOAD)} requests) through round robin: {would_fail} chunk(s) out of memory")
    assert would_fail > 0


def rotation_out_of_memory(tiers: list[str], budgets: dict) -> int:
    """Chunks of WORKLOAD that round robin (deployments/dispatch.py assign_baseline) would put on a card that cannot
    hold them even degraded, for a rotation starting at the first tier."""
    rotation = failed = 0
    for side, n in WORKLOAD:
        remaining = n
        while remaining:
            tier = tiers[rotation % len(tiers)]
            rotation += 1
            profile = default_profile(tier, budgets[tier][1])
            size = min(remaining, profile.max_n)
            failed += predict_peak(side, side, size, degraded_profile(profile) or profile).total > budgets[tier][0]
            remaining -= size
    return failed
