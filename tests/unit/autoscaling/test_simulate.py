"""The fleet simulator: deterministic, memory-safe with the real routing, and cheaper than fixed replicas."""

import json
import time
from pathlib import Path

import pytest

from autoscaling.simulate import WorkloadSpec, build_cards, generate_requests, scale_fleet, simulate
from cluster.nvml import load_fleet_file

FLEETS = Path(__file__).resolve().parents[3] / "cluster" / "fleets"


@pytest.fixture(scope="module")
def mixed_results():
    """Every policy on the mixed fleet scaled to 60 cards, 15 simulated minutes (about a second of wall time)."""
    started = time.perf_counter()
    results = simulate(FLEETS / "mixed.yaml", ["policy", "fixed", "ray_default"], 900, WorkloadSpec(rate=0.6),
                       cards=60, seed=3)
    return results, time.perf_counter() - started


def test_same_seed_same_run_and_another_seed_another_run():
    runs = [simulate(FLEETS / "mixed.yaml", ["policy"], 240, WorkloadSpec(rate=0.3), cards=12, seed=s)["policy"]
            for s in (5, 5, 6)]
    for r in runs:
        r.pop("wall_s")
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_real_policy_has_no_out_of_memory_on_the_mixed_fleet(mixed_results):
    results, _ = mixed_results
    assert results["policy"]["out_of_memory"] == 0
    assert results["policy"]["completed"] > 0
    assert results["policy"]["rejected"]["no_tier_fits"] == 0


def test_fixed_replicas_idle_more_gpu_hours_than_the_policy(mixed_results):
    results, _ = mixed_results
    assert results["fixed"]["gpu_hours"]["idle"] > results["policy"]["gpu_hours"]["idle"]
    assert results["fixed"]["gpu_hours"]["off"] == 0


def test_a_small_run_finishes_quickly(mixed_results):
    _, wall_s = mixed_results
    assert wall_s < 10


def test_report_has_every_field_and_replicas_over_time(mixed_results):
    results, _ = mixed_results
    r = results["policy"]
    for key in ("images_per_s", "p50_s", "p95_s", "p99_s", "rejections", "out_of_memory", "gpu_hours"):
        assert key in r
    assert r["replicas_over_time"][0][0] == 0.0
    assert set(r["replicas_over_time"][-1][1]) == {"vram_4", "vram_6", "vram_8", "vram_12", "vram_24"}
    json.dumps(results)


def test_cards_scales_the_mix_of_the_fleet_file():
    specs = scale_fleet(load_fleet_file(FLEETS / "large.yaml"), 1000)
    assert sum(s.count for s in specs) == 1000
    assert len(build_cards(specs)) == 1000
    # The 4090s (2 of 48) stay about 2/48 of the fleet.
    assert sum(s.count for s in specs if "4090" in s.model) in (41, 42)


def test_trace_workload_is_replayed_as_given():
    spec = WorkloadSpec(requests=[{"t": 5, "size": "512x768", "n": 2}, {"t": 1, "size": "1024x1024"}])
    requests = generate_requests(spec, 10, None)
    assert [(r.t, r.width, r.height, r.n) for r in requests] == [(1, 1024, 1024, 1), (5, 512, 768, 2)]


def test_request_no_tier_holds_is_rejected_not_run():
    spec = WorkloadSpec(requests=[{"t": 0, "size": "2048x2048", "n": 1}])
    result = simulate(FLEETS / "single-4gb.yaml", ["fixed"], 60, spec)["fixed"]
    assert result["rejected"]["no_tier_fits"] == 1
    assert result["out_of_memory"] == 0


def test_zit_simulate_prints_one_json_record_per_policy(capsys, tmp_path):
    from cli.main import main

    plot = tmp_path / "replicas.png"
    assert main(["simulate", "--fleet", str(FLEETS / "mixed.yaml"), "--rate", "0.2", "--duration", "120",
                 "--json", "--plot", str(plot)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in records] == ["policy", "fixed", "ray_default"]
    assert plot.exists() or plot.with_suffix(".html").exists()


def test_the_front_counts_every_request_and_says_how_many_ingress_replicas_carry_it():
    """1024x1024 images at 10 and 30 requests/s for a minute: about 0.34 and 1.03 cores of ingress CPU by the
    bench's figures, so one ingress replica, then two (70 % of a core each); a 64x64 request costs the fixed part."""
    from autoscaling.simulate import FRONT_CPU_MS, Request, front_load

    def minute(rate: int, side: int = 1024) -> list[Request]:
        return [Request(i, i / rate, side, side, 1, 9) for i in range(60 * rate)]

    fixed, per_mpix = FRONT_CPU_MS["ingress"]
    per_request = fixed + per_mpix * 1.048576
    light, busy = front_load(minute(10), 60.0), front_load(minute(30), 60.0)
    assert light["ingress"]["ms_per_request"] == pytest.approx(per_request, abs=0.05)
    assert light["ingress"]["peak_cores"] == pytest.approx(10 * per_request / 1000, abs=0.01)
    assert 0.7 < busy["ingress"]["peak_cores"] < 1.4  # more than one replica's 70 %, less than two
    assert (light["ingress"]["processes_needed"], busy["ingress"]["processes_needed"]) == (1, 2)
    assert front_load(minute(10, 64), 60.0)["ingress"]["ms_per_request"] == pytest.approx(fixed, abs=0.15)
    assert busy["proxy"]["processes_needed"] == 1  # the proxy's share is smaller
