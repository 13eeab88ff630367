"""Faults under load on the simulated mixed fleet (bench/faults.py runs the same scenario as a benchmark).

A steady mixed load; the replica processes of two tiers killed with SIGKILL; then, while the RTX 3070 (the only card
of vram_8) runs a chunk, its node's raylet killed with SIGKILL. Every request must end 200 with its images or 503 with
Retry-After, none may wait longer than twice its expected time plus the detection delay, the chunk that ran on the
lost card must move (node_lost or replica_died, then to another tier), and the service must serve afterwards with the
lost card shown in GET /v1/fleet.
"""

from __future__ import annotations

import pytest

from bench.faults import LOST_TIER, run_faults, wait_until_serving
from runtime.simfleet import kill_card_raylet
from tests.system.conftest import deploy_once, tiny_lora_dir, wait_for_policy

# On the shared mixed-fleet cluster (started at bench.faults' time scale), after every other test on it: this one
# leaves a card's node dead.
pytestmark = [pytest.mark.system, pytest.mark.timeout(900), pytest.mark.redeploys(order=2)]


@pytest.fixture(scope="module")
def fault_run(mixed_fleet):
    cards, _ = mixed_fleet
    url = deploy_once(mixed_fleet, lora_dir=tiny_lora_dir())  # the service test_routing and test_webui ran on
    wait_for_policy(url, "tier_aware", "vram_aware")
    wait_until_serving(url, len(cards))
    return run_faults(url, cards, kill_card_raylet, requests=24, concurrency=6, say=print), cards


def test_every_request_ends_with_its_images_or_503_with_retry_after(fault_run):
    run, _ = fault_run
    assert not run.bad(), [(a.body, a.status, a.error) for a in run.bad()]
    assert sum(a.status == 200 for a in run.answers) >= len(run.answers) - 2, [a.status for a in run.answers]


def test_no_request_waits_longer_than_twice_its_expected_time_plus_the_detection_delay(fault_run):
    run, _ = fault_run
    assert run.node_dead_after_s is not None, "Ray never reported the killed card's node dead"
    slow = [(a.body["size"], a.body["n"], round(a.seconds, 1), round(2 * run.expected_s(a) + run.detection_delay_s, 1))
            for a in run.too_slow()]
    assert not slow, slow


def test_the_lost_tier_is_noticed_within_ten_seconds_of_ray_reporting_its_node_dead(fault_run):
    run, _ = fault_run
    assert run.lost_after_s is not None, "GET /v1/fleet never showed the tier lost"
    assert run.lost_after_s <= run.node_dead_after_s + 10, (run.node_dead_after_s, run.lost_after_s)


def test_the_chunk_on_the_lost_card_moved_to_another_tier(fault_run):
    run, _ = fault_run
    moved = [r for a in run.answers for r in a.retries if r["from"] == LOST_TIER]
    assert moved, "no chunk ran on the lost card when its node died: the fault was not exercised"
    assert {r["reason"] for r in moved} <= {"node_lost", "replica_died"}, moved
    # Its last move took it off the lost tier (a dead replica is retried on its own tier first, then moves).
    assert all(r["to"] != LOST_TIER for r in moved if r["reason"] == "node_lost")
    assert any(r["reason"] == "node_lost" or r["to"] != LOST_TIER for r in moved), moved
    killed = {r["from"] for a in run.answers for r in a.retries if r["reason"] == "replica_died"}
    assert killed, "no chunk was retried after its replica process was killed"


def test_the_fleet_view_answers_while_a_card_node_dies(fault_run):
    run, _ = fault_run
    assert not run.watch_errors, run.watch_errors


def test_the_service_serves_afterwards_and_shows_the_lost_card(fault_run):
    run, cards = fault_run
    assert run.after is not None and run.after.status == 200 and run.after.images == 2, run.after
    victim = next(c for c in cards if c.tier == LOST_TIER)
    card = next(c for c in run.fleet_after["cards"] if c["uuid"] == victim.uuid)
    assert card["node_alive"] is False
    tier = next(t for t in run.fleet_after["tiers"] if t["name"] == LOST_TIER)
    assert tier["lost"] and victim.uuid in tier["lost"]
    # The tiers whose replicas were killed are back: Serve restarted them where their cards still are.
    running = {t["name"]: t["replicas_running"] for t in run.fleet_after["tiers"]}
    assert all(running[tier] >= 1 for tier in run.killed_pids), running
