"""A card's PCIe link (cluster/link.py): NVML's readings (real names, through the fake backend), the copy rate they
give, the time model on it, the tiers' slowest link, the switch to 8 bits a slow link earns, and what `zit fleet`
says."""

import json
from types import SimpleNamespace

import pynvml
import pytest
import yaml

from cluster.link import DEFAULT_LINK, PCIE_BYTES_S, Link, degraded, link_of, pcie_bytes_s
from cluster.nvml import FakeNvml, load_fleet, probe, read_card
from cluster.profiles import default_profile, tier_profile
from cluster.speed import predict_seconds, prior_units_per_s, reference_step_s
from cluster.tiers import tier_link, tiers_for_cards
from runtime.nodes import LINK_SWITCH_GAIN, link_bound_tiers, plan_card_nodes, stored_in_8_bits


def fleet(tmp_path, *cards, name="links"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "cards": list(cards)}))
    return path


def card(model="NVIDIA GeForce RTX 2060", vram_gb=6, cc="7.5", speed=0.2, **more):
    return {"model": model, "vram_gb": vram_gb, "compute_capability": cc, "speed": speed, **more}


def test_lane_rates_give_what_pinned_copies_sustain():
    assert pcie_bytes_s(3, 16) == pytest.approx(12.6e9, rel=0.01)  # the old default's board
    assert pcie_bytes_s(3, 1) == pytest.approx(0.79e9, rel=0.01)  # an x1 riser
    assert pcie_bytes_s(4, 16) == pytest.approx(2 * pcie_bytes_s(3, 16), rel=0.01)
    assert pcie_bytes_s(1, 16) < pcie_bytes_s(2, 16) < pcie_bytes_s(3, 16) < pcie_bytes_s(5, 16)


def test_the_fake_driver_answers_nvmls_link_calls_and_the_snapshot_keeps_them(tmp_path):
    path = fleet(tmp_path, card(pcie={"gen": 3, "width": 4, "max_gen": 4, "max_width": 16}), card(model="other"))
    nvml = FakeNvml(path, state_dir=tmp_path / "state")
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert (nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle), nvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
            nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle), nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)) == (3, 4, 4, 16)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # a simulated card has no throughput counters
        nvml.nvmlDeviceGetPcieThroughput(handle, pynvml.NVML_PCIE_UTIL_TX_BYTES)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # a card without a link in its fleet file
        nvml.nvmlDeviceGetCurrPcieLinkWidth(nvml.nvmlDeviceGetHandleByIndex(1))
    linked, unknown = probe(nvml)
    assert (linked.pcie_gen, linked.pcie_width, linked.pcie_max_gen, linked.pcie_max_width) == (3, 4, 4, 16)
    assert linked.pcie_tx_bytes_s is None and linked.pcie_rx_bytes_s is None
    assert (unknown.pcie_gen, unknown.pcie_width) == (None, None)
    # The rate: the maximum generation (idle cards lower the current one) at the current width.
    assert link_of(linked) == Link(pcie_bytes_s(4, 4), "pcie", "gen4 x4")
    assert link_of(unknown) == DEFAULT_LINK
    assert linked.to_dict()["link"]["source"] == "pcie" and linked.to_dict()["link_degraded"] == "link width x4 of x16"


def test_throughput_counters_are_read_in_bytes_per_second(tmp_path):
    """NVML gives KB/s; a driver with the counters fills both directions."""
    nvml = FakeNvml(fleet(tmp_path, card(pcie={"gen": 4, "width": 16})), state_dir=tmp_path / "state")
    nvml.nvmlDeviceGetPcieThroughput = lambda handle, counter: {pynvml.NVML_PCIE_UTIL_TX_BYTES: 10,
                                                                 pynvml.NVML_PCIE_UTIL_RX_BYTES: 2000}[counter]
    nvml.nvmlInit()
    snapshot = read_card(nvml, 0)
    assert (snapshot.pcie_tx_bytes_s, snapshot.pcie_rx_bytes_s) == (10 * 1024.0, 2000 * 1024.0)


def test_a_measured_rate_wins_over_the_link_and_the_link_over_the_default():
    x1 = SimpleNamespace(pcie_gen=1, pcie_width=1, pcie_max_gen=3, pcie_max_width=1)
    assert link_of(x1, measured_bytes_s=0.5e9) == Link(0.5e9, "measured")
    assert link_of(x1).source == "pcie" and link_of(x1).bytes_s == pytest.approx(0.79e9, rel=0.01)
    assert link_of(SimpleNamespace()) == DEFAULT_LINK and DEFAULT_LINK.bytes_s == PCIE_BYTES_S
    assert "gen3 x1" in link_of(x1).describe() and "measured" in link_of(x1, 0.5e9).describe()


@pytest.mark.parametrize("reading, why", [
    (dict(pcie_gen=3, pcie_width=16, pcie_max_gen=3, pcie_max_width=16, utilization_pct=100), None),
    (dict(pcie_gen=3, pcie_width=1, pcie_max_gen=3, pcie_max_width=16, utilization_pct=0), "link width x1 of x16"),
    (dict(pcie_gen=1, pcie_width=16, pcie_max_gen=4, pcie_max_width=16, utilization_pct=0), None),  # idle: power saving
    (dict(pcie_gen=1, pcie_width=16, pcie_max_gen=4, pcie_max_width=16, utilization_pct=90),
     "link generation 1 of 4 while busy"),
    (dict(), None),  # NVML reports no link
], ids=["healthy", "trained down to x1", "idle at gen 1", "busy at gen 1", "unknown"])
def test_a_link_below_its_maximum_is_degraded_but_an_idle_cards_power_saving_is_not(reading, why):
    assert degraded(SimpleNamespace(**reading)) == why


def test_fleet_files_refuse_a_link_above_its_maximum_and_odd_widths(tmp_path):
    for bad in ({"gen": 4, "width": 16, "max_gen": 3}, {"gen": 3, "width": 16, "max_width": 8}, {"gen": 3, "width": 3},
                {"gen": 7, "width": 16}):
        with pytest.raises(ValueError):
            load_fleet(fleet(tmp_path, card(pcie=bad)))


def test_streamed_weights_take_the_cards_link_and_resident_ones_do_not_care():
    streaming = default_profile("vram_6", False)
    x16, x1 = Link(pcie_bytes_s(3, 16), "pcie", "gen3 x16"), Link(pcie_bytes_s(3, 1), "pcie", "gen3 x1")
    fast = predict_seconds(1024, 1024, 1, 9, streaming, 0.2, link=x16)
    slow = predict_seconds(1024, 1024, 1, 9, streaming, 0.2, link=x1)
    # 12.3 GB of bf16 weights a step: 15.6 s on the riser, where the card's arithmetic takes about 2.2 s.
    assert slow.per_step_s(9) == pytest.approx(12.3e9 / x1.bytes_s, rel=0.02) and slow.link == x1
    assert slow.total_s > 5 * fast.total_s
    resident = default_profile("vram_12", True)
    on_riser, on_x16 = (predict_seconds(1024, 1024, 1, 9, resident, 0.35, link=link) for link in (x1, x16))
    assert on_riser.denoise_s == on_x16.denoise_s and on_riser.copy_s == 0
    # Its group-offloaded text encoder (8 GB in bf16) still crosses the link once per prompt.
    assert on_riser.encode_s - on_x16.encode_s == pytest.approx(8.04e9 / x1.bytes_s - 8.04e9 / x16.bytes_s, rel=0.02)
    assert prior_units_per_s("vram_6", 0.2, False, x1) < prior_units_per_s("vram_6", 0.2, False, x16) / 4


def test_a_tier_takes_its_slowest_cards_link(tmp_path):
    cards = load_fleet(fleet(tmp_path, card(pcie={"gen": 3, "width": 16}), card(pcie={"gen": 3, "width": 1}), card()))
    [tier] = tiers_for_cards(cards)
    assert tier.link_bytes_s == pytest.approx(pcie_bytes_s(3, 1)) and tier.link_detail == "gen3 x1"
    assert tier_link(tier).bytes_s == tier.link_bytes_s
    assert tier_link(tier.model_copy(update={"link_aware": False})) == DEFAULT_LINK
    [unknown] = tiers_for_cards(load_fleet(fleet(tmp_path, card(), name="unknown")))
    assert unknown.link_bytes_s is None and tier_link(unknown) == DEFAULT_LINK


def test_a_streaming_tier_on_a_slow_link_is_stored_in_8_bits_and_says_why(repo_root):
    cards = load_fleet(repo_root / "cluster" / "fleets" / "large.yaml")  # lab-03's 1660 SUPERs sit on x1 risers
    tiers = tiers_for_cards(cards)
    why = link_bound_tiers(tiers, {t.name: tier_profile(t) for t in tiers})
    assert list(why) == ["vram_6"], why  # vram_8 streams 8 bits already; the resident tiers do not stream
    assert "gen3 x1" in why["vram_6"] and "7.8 s instead of 15.6 s" in why["vram_6"]
    vram_6 = next(t for t in tiers if t.name == "vram_6")
    now, lighter = (reference_step_s(tier_profile(t), vram_6.speed, tier_link(vram_6))
                    for t in (vram_6, stored_in_8_bits(vram_6)))
    assert now >= LINK_SWITCH_GAIN * lighter
    # A config that sets the storage keeps it; a service told to ignore links switches nothing.
    assert link_bound_tiers(tiers, {t.name: tier_profile(t) for t in tiers},
                            [vram_6.model_copy(update={"profile": {"storage_dtype": "bfloat16"}})]) == {}
    blind = [t.model_copy(update={"link_aware": False}) for t in tiers]
    assert link_bound_tiers(blind, {t.name: tier_profile(t) for t in blind}) == {}
    # zit up's plan runs the tier in 8 bits and says so on the hosts of its cards.
    plan = plan_card_nodes(cards, repo_root / "cluster" / "fleets" / "large.yaml",
                           host_ram=load_fleet_file_ram(repo_root), head_host="lab-01")
    planned = next(t for t in plan.tiers if t.name == "vram_6")
    assert planned.profile.get("storage_dtype") == "float8_e4m3fn"
    assert any("link" in line for line in plan.hosts["lab-03"].changed), plan.hosts["lab-03"].changed


def load_fleet_file_ram(repo_root):
    from cluster.nvml import load_fleet_file

    return load_fleet_file(repo_root / "cluster" / "fleets" / "large.yaml").host_ram_bytes()


def test_a_good_link_switches_nothing(repo_root):
    cards = load_fleet(repo_root / "cluster" / "fleets" / "mixed.yaml")  # x4 and x8 links: compute-bound
    tiers = tiers_for_cards(cards)
    assert link_bound_tiers(tiers, {t.name: tier_profile(t) for t in tiers}) == {}


def test_zit_fleet_json_shows_each_cards_link_and_predicted_step(repo_root, capsys):
    from cli.main import main

    assert main(["fleet", "--fleet", str(repo_root / "cluster" / "fleets" / "mixed.yaml"), "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert all(c["link"]["source"] == "pcie" and c["predicted_step_s"] > 0 and c["profile"] for c in cards), cards
    by_model = {c["name"].removeprefix("NVIDIA GeForce "): c for c in cards}
    assert by_model["GTX 1650"]["link"]["detail"] == "gen3 x4" and by_model["RTX 4090"]["pcie_width"] == 16
    assert by_model["RTX 4090"]["predicted_step_s"] < by_model["RTX 3060"]["predicted_step_s"] < \
        by_model["GTX 1650"]["predicted_step_s"]


def test_zit_fleet_says_which_tier_its_link_switched_and_warns_of_a_degraded_link(repo_root, capsys):
    from cli.main import main

    assert main(["fleet", "--fleet", str(repo_root / "cluster" / "fleets" / "large.yaml")]) == 0
    out = capsys.readouterr().out
    assert "changed: vram_6: transformer stored in float8_e4m3fn for its slowest card's link" in out
    assert "warning: NVIDIA GeForce RTX 2070 SUPER [19] on lab-05: PCIe link width x4 of x16" in out
    riser = next(line for line in out.splitlines() if "1660 SUPER" in line)
    assert "gen3 x1 0.79G/s" in riser and " 7.81s" in riser  # the 8-bit step on the riser
