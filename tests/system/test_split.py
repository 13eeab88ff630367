"""A big card split into slots of a smaller tier (`zit up --split 'RTX 4090=vram_8'`): three vram_8 replicas share
one simulated RTX 4090 (a third of the GPU each, each capped at the slot's budget) beside an RTX 3070, and the tier
serves from all four without running out of memory. The RTX 3070 sits on an x1 riser: the in-tier router knows it is
slow before it has run anything and gives it less work than each fast slot."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.memory import resident_bytes
from cluster.profiles import default_profile
from runtime.simfleet import fleet_cluster
from tests.system.conftest import TEST_FLEETS, deploy, wait_for_replicas

pytestmark = pytest.mark.system

GIB = 1 << 30


@pytest.fixture(scope="module")
def split_fleet():
    with fleet_cluster(TEST_FLEETS / "split.yaml", splits=["RTX 4090=vram_8"]) as (cards, port):
        url = deploy(cards, port)
        fleet = wait_for_replicas(url, 4)
        yield cards, url, fleet


def generate_all(url: str, prompt: str, size: str, count: int, at_once: int) -> list[dict]:
    """`count` one-image requests, `at_once` at a time; every one must succeed. Their metadata, in order."""
    def one(i):
        body = {"prompt": f"{prompt} {i}", "size": size, "n": 1, "seed": i, "steps": 2}
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)

    with ThreadPoolExecutor(at_once) as pool:
        responses = list(pool.map(one, range(count)))
    assert [r.status_code for r in responses] == [200] * count, [r.text[:300] for r in responses
                                                                 if r.status_code != 200]
    return [r.json()["metadata"] for r in responses]


def test_the_big_card_hosts_three_replicas_of_the_smaller_tier(split_fleet):
    cards, url, fleet = split_fleet
    assert [(c.tier, c.slots) for c in cards] == [("vram_8", 3), ("vram_8", 1)]
    [tier] = fleet["tiers"]
    assert (tier["name"], tier["cards"], tier["slots"], tier["replicas_running"]) == ("vram_8", 2, 4, 4)
    rtx4090 = next(c for c in fleet["cards"] if c["uuid"] == cards[0].uuid)
    assert rtx4090["slots"] == 3 and len(rtx4090["replicas"]) == 3 and rtx4090["vram_gb"] == 24
    # The three replicas' weights are on the card, as NVML reports it.
    resident = resident_bytes(default_profile("vram_8", True)) / GIB
    assert rtx4090["memory_used_gib"] == pytest.approx(3 * resident, abs=0.05)


def test_the_tier_serves_from_every_slot_without_running_out_of_memory(split_fleet):
    cards, url, fleet = split_fleet
    on_4090 = set(next(c for c in fleet["cards"] if c["uuid"] == cards[0].uuid)["replicas"])

    meta = generate_all(url, "slot", "768x768", count=8, at_once=8)
    assert not [r for m in meta for r in m["retries"]], meta  # nothing needed a retry: no out-of-memory
    served = {c["replica"] for m in meta for c in m["chunks"]}
    assert on_4090 <= served, (on_4090, served)  # every slot of the big card took work


def test_the_card_on_an_x1_riser_gets_less_work_than_each_fast_slot(split_fleet):
    """Its replica reports the time model's step on its own link (7.8 s at 1024x1024, 0.44 s on a slot of the x16
    RTX 4090): counted as many requests ahead, it is sent work only when the slots are queued that deep."""
    cards, url, fleet = split_fleet
    riser = next(c for c in fleet["cards"] if c["uuid"] == cards[1].uuid)
    assert (riser["pcie_gen"], riser["pcie_width"], riser["link"]["detail"]) == (3, 1, "gen3 x1"), riser
    [riser_replica] = riser["replicas"]
    on_4090 = set(next(c for c in fleet["cards"] if c["uuid"] == cards[0].uuid)["replicas"])
    # What the router ranks by, before anything ran: the riser's step is 17x a slot's (3.3x by speed alone).
    steps = {r["replica"]: r["reference_step_s"] for r in fleet["replicas"]}
    assert steps[riser_replica] > 10 * max(steps[r] for r in on_4090), steps

    served = [c["replica"] for m in generate_all(url, "riser", "512x512", count=16, at_once=4) for c in m["chunks"]]
    per_slot = [served.count(replica) for replica in on_4090]
    # Less than a fair share: the 16 chunks over the three slots, none or one on the riser. (Which slots take them is
    # the router's choice by load and measured speed: one slot may take none.)
    assert served.count(riser_replica) <= 1 and sum(per_slot) >= 15, (served.count(riser_replica), per_slot)
