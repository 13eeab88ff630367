"""How cards become Ray nodes, and how a simulated card enforces its memory budget."""

import json
import re

import pytest
import torch
import yaml

from cli.main import main
from cluster.nvml import FakeNvml, LocalCard, load_fleet, probe
from cluster.simcard import SimulatedCard
from runtime.nodes import card_node, nodes_for_cards

GIB = 1 << 30


@pytest.fixture()
def mixed(repo_root):
    return repo_root / "cluster" / "fleets" / "mixed.yaml"


def test_a_host_with_two_different_cards_becomes_two_nodes_of_different_tiers(mixed):
    host_a = [c for c in load_fleet(mixed) if c.host == "host-a"]
    nodes, skipped = nodes_for_cards(host_a, mixed)
    assert skipped == []
    assert [n.resources for n in nodes] == [{"vram_4": 1.0}, {"vram_12": 1.0}]
    assert [n.labels["zit/card"] for n in nodes] == [c.uuid for c in host_a]
    assert nodes[0].labels["zit/bf16"] == "false" and nodes[1].labels["zit/bf16"] == "true"
    assert nodes[1].labels["zit/model"] == "nvidia-geforce-rtx-3060"
    assert all(n.env == {"ZIT_FLEET_FILE": str(mixed.resolve())} for n in nodes)


def test_a_real_card_node_sees_only_its_card(mixed):
    card = load_fleet(mixed)[1]
    real = card.__class__(**{**card.__dict__, "simulated": False})
    assert card_node(real).env == {"CUDA_VISIBLE_DEVICES": card.uuid}


def test_too_small_card_is_skipped_with_a_reason(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "cards": [
        {"model": "GT 1030", "vram_gb": 2, "compute_capability": "6.1"},
        {"model": "RTX 3060", "vram_gb": 12, "compute_capability": "8.6"}]}))
    nodes, skipped = nodes_for_cards(load_fleet(path), path)
    assert len(nodes) == 1 and "GT 1030" in skipped[0] and "below the smallest tier" in skipped[0]


def test_a_card_other_processes_fill_is_skipped_and_one_with_room_left_joins(tmp_path):
    from cluster.memory import resident_bytes
    from cluster.profiles import default_profile

    need_mib = -(-resident_bytes(default_profile("vram_12", True)) // 2**20)  # rounded up
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "cards": [
        {"model": "RTX 3060", "vram_gb": 12, "compute_capability": "8.6", "foreign_memory_mib": 12 * 1024 - need_mib + 1},
        {"model": "RTX 3060", "vram_gb": 12, "compute_capability": "8.6", "foreign_memory_mib": 12 * 1024 - need_mib}]}))
    nodes, skipped = nodes_for_cards(load_fleet(path), path)
    assert len(nodes) == 1 and len(skipped) == 1
    assert "other processes hold" in skipped[0] and "vram_12 replica keeps" in skipped[0]
    assert nodes[0].labels["zit/card"] == load_fleet(path)[1].uuid


def sim_card(path, index, state_dir) -> SimulatedCard:
    nvml = FakeNvml(path, state_dir=state_dir)
    nvml.nvmlInit()
    return SimulatedCard(LocalCard(nvml.cards[index].uuid, index, nvml, simulated=True))


def test_simulated_card_refuses_what_does_not_fit_with_cudas_error(mixed, tmp_path):
    card = sim_card(mixed, 0, tmp_path)  # GTX 1650: 3911 MiB
    card.hold(2 * GIB)
    with card.running(3 * GIB, "a small image"):
        assert probe(FakeNvml(mixed, state_dir=tmp_path))[0].memory_used == 3 * GIB
    assert probe(FakeNvml(mixed, state_dir=tmp_path))[0].memory_used == 2 * GIB
    with pytest.raises(torch.OutOfMemoryError, match=r"CUDA out of memory\. Tried to allocate 2\.00 GiB.*GTX 1650"):
        with card.running(4 * GIB, "1024x1024 n=1"):
            pass
    assert probe(FakeNvml(mixed, state_dir=tmp_path))[0].memory_used == 2 * GIB  # nothing leaked


def test_simulated_card_counts_memory_held_by_others(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "cards": [
        {"model": "RTX 3060", "vram_gb": 12, "compute_capability": "8.6", "foreign_memory_mib": 8192}]}))
    card = sim_card(path, 0, tmp_path / "s")
    card.hold(3 * GIB)
    with pytest.raises(torch.OutOfMemoryError, match="8.00 GiB is held by other processes"):
        card.hold(5 * GIB, "bigger weights")


def test_weights_that_do_not_fit_fail_at_load(mixed, tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        sim_card(mixed, 0, tmp_path).hold(5 * GIB)


@pytest.mark.parametrize("name", ["mixed", "single-4gb", "large"])
def test_zit_fleet_json_lists_every_card_with_its_tier(repo_root, capsys, name):
    path = repo_root / "cluster" / "fleets" / f"{name}.yaml"
    assert main(["fleet", "--fleet", str(path), "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    expected = yaml.safe_load(path.read_text())["cards"]
    assert len(cards) == sum(c.get("count", 1) for c in expected)
    assert all(c["tier"] and c["tier"].startswith("vram_") and c["simulated"] for c in cards)
    assert {c["name"] for c in cards} == {c["model"] for c in expected}


def test_zit_fleet_without_a_driver_points_at_the_simulated_fleet(capsys):
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert main(["fleet"]) == 1
        assert "zit fleet --fleet" in capsys.readouterr().out
    else:  # a machine with a driver lists its real cards
        pynvml.nvmlShutdown()
        assert main(["fleet"]) == 0 and "card(s)" in capsys.readouterr().out


def test_zit_node_refuses_an_unknown_host(mixed, capsys):
    assert main(["node", "--address", "127.0.0.1:1", "--fleet", str(mixed), "--host", "nowhere"]) == 2
    assert "no card" in capsys.readouterr().out


# -- split cards: a big card as several slots of a smaller tier -----------------------------------------------------


def test_zit_fleet_and_zit_node_take_splits_and_refuse_bad_ones(mixed, capsys):
    assert main(["fleet", "--fleet", str(mixed), "--split", "RTX 4090=vram_8", "--json"]) == 0
    rtx4090 = next(c for c in json.loads(capsys.readouterr().out) if "4090" in c["name"])
    assert (rtx4090["tier"], rtx4090["slots"]) == ("vram_8", 3)
    assert main(["fleet", "--fleet", str(mixed), "--split", "RTX 3060=vram_8"]) == 2
    assert "holds only one vram_8 slot" in capsys.readouterr().out
    assert main(["node", "--address", "127.0.0.1:1", "--fleet", str(mixed), "--split", "Voodoo=vram_8"]) == 2
    assert "no card matches 'Voodoo'" in capsys.readouterr().out


def test_a_split_card_offers_slots_of_the_smaller_tier(mixed):
    from runtime.nodes import apply_splits

    cards = apply_splits(load_fleet(mixed), ["RTX 4090=vram_12"])
    rtx4090 = next(c for c in cards if "4090" in c.name)
    assert (rtx4090.tier, rtx4090.slots) == ("vram_12", 2)
    node = card_node(rtx4090, mixed)
    assert node.resources == {"vram_12": 2.0}
    assert node.labels["zit/tier"] == "vram_12" and node.labels["zit/slots"] == "2"
    assert node.labels["zit/vram-gb"] == "24"  # what the card is
    assert [(c.tier, c.slots) for c in cards if "4090" not in c.name] == \
        [(c.tier, 1) for c in load_fleet(mixed) if "4090" not in c.name]


@pytest.mark.parametrize("spec, says", [
    ("4", "write CARD=TIER"),
    ("Voodoo=vram_8", "no card matches 'Voodoo'"),
    ("RTX 4090=vram_24", "smaller tier than its own"),
    ("RTX 4090=vram_64", "unknown tier 'vram_64'"),
    ("RTX 3060=vram_8", "holds only one vram_8 slot"),
    ("4090=vram_8", "no card matches '4090'"),  # digits are an index, never part of a name
])
def test_a_split_that_cannot_be_done_says_why(mixed, spec, says):
    from runtime.nodes import apply_splits

    with pytest.raises(ValueError, match=re.escape(says)):
        apply_splits(load_fleet(mixed), [spec])


def test_one_card_named_by_two_splits_is_refused(mixed):
    from runtime.nodes import apply_splits

    with pytest.raises(ValueError, match="both match card 4"):
        apply_splits(load_fleet(mixed), ["RTX 4090=vram_12", "4=vram_8"])


def test_a_split_cards_node_has_a_cpu_per_slot(mixed):
    from runtime.nodes import CARD_NODE_CPUS, apply_splits

    nodes, _ = nodes_for_cards(apply_splits(load_fleet(mixed), ["RTX 4090=vram_8"]), mixed)
    assert [n.num_cpus for n in nodes] == [CARD_NODE_CPUS] * 4 + [CARD_NODE_CPUS + 2]


def test_split_by_index_or_uuid_and_the_slots_memory_must_fit(mixed):
    from cluster.memory import resident_bytes
    from cluster.profiles import default_profile
    from runtime.nodes import apply_splits, room_problem

    cards = load_fleet(mixed)
    rtx4090 = next(c for c in cards if "4090" in c.name)
    by_index = apply_splits(cards, [f"{rtx4090.index}=vram_8"])
    by_uuid = apply_splits(cards, [f"{rtx4090.uuid}=vram_8"])
    assert [(c.tier, c.slots) for c in by_index] == [(c.tier, c.slots) for c in by_uuid]
    split = next(c for c in by_index if c.uuid == rtx4090.uuid)
    assert (split.tier, split.slots) == ("vram_8", 3)
    assert room_problem(split) is None
    # Other processes leave room for two vram_8 replicas but not three: the card is not joined.
    resident = resident_bytes(default_profile("vram_8", True))
    crowded = split.__class__(**{**split.__dict__, "foreign_memory": split.memory_total - 2 * resident - 1})
    assert "3 vram_8 replicas keep" in room_problem(crowded)


def test_a_capped_process_is_refused_beyond_its_cap_on_a_card_with_room(mixed, tmp_path):
    nvml = FakeNvml(mixed, state_dir=tmp_path)
    nvml.nvmlInit()
    rtx4090 = next(c for c in nvml.cards if "4090" in nvml.nvmlDeviceGetName(c))
    card = SimulatedCard(LocalCard(rtx4090.uuid, rtx4090.index, nvml, simulated=True), limit_bytes=12 * GIB)
    card.hold(6 * GIB)
    with card.running(12 * GIB, "at the cap"):
        pass
    with pytest.raises(torch.OutOfMemoryError):
        with card.running(13 * GIB, "over the cap, with 11 GiB of the card free"):
            pass


# -- configured tier tables, failed cards, the head's address, cards already joined --------------------------------


@pytest.fixture()
def no_tier_table(monkeypatch):
    """No ZIT_VRAM_TIERS_GB now, and none left behind by `--tiers` (which sets it for the process)."""
    monkeypatch.setenv("ZIT_VRAM_TIERS_GB", "")  # so that monkeypatch restores the variable's absence afterwards
    monkeypatch.delenv("ZIT_VRAM_TIERS_GB")


def test_zit_fleet_classifies_with_the_tiers_option(mixed, capsys, no_tier_table):
    import os

    assert main(["fleet", "--tiers", "4,8,24", "--fleet", str(mixed), "--json"]) == 0
    tiers = {c["name"]: c["tier"] for c in json.loads(capsys.readouterr().out)}
    assert tiers == {"NVIDIA GeForce GTX 1650": "vram_4", "NVIDIA GeForce RTX 2060": "vram_4",
                     "NVIDIA GeForce RTX 3070": "vram_8", "NVIDIA GeForce RTX 3060": "vram_8",
                     "NVIDIA GeForce RTX 4090": "vram_24"}
    assert os.environ["ZIT_VRAM_TIERS_GB"] == "4,8,24"  # what the Ray processes started next would inherit


def test_zit_fleet_refuses_a_malformed_tier_table(mixed, capsys, monkeypatch):
    monkeypatch.setenv("ZIT_VRAM_TIERS_GB", "4,eight")
    assert main(["fleet", "--fleet", str(mixed)]) == 2
    assert "error: ZIT_VRAM_TIERS_GB='4,eight': 'eight' is not a whole number of GB" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: exit 2 with the reason on stderr
        main(["fleet", "--fleet", str(mixed), "--tiers", "4,4"])
    assert "--tiers='4,4': 4 GB is listed twice" in capsys.readouterr().err


def test_zit_fleet_summary_lists_tiers_smallest_first(mixed, capsys, no_tier_table):
    assert main(["fleet", "--fleet", str(mixed)]) == 0  # the file lists 4, 12, 6, 8, 24 GB
    assert capsys.readouterr().out.splitlines()[-1] == \
        "5 card(s): 1 x vram_4, 1 x vram_6, 1 x vram_8, 1 x vram_12, 1 x vram_24"


@pytest.fixture()
def with_a_lost_card(tmp_path):
    path = tmp_path / "lost.yaml"
    path.write_text(yaml.safe_dump({"name": "lost", "cards": [
        {"model": "NVIDIA GeForce RTX 3060", "vram_gb": 12, "compute_capability": "8.6", "host": "a"},
        {"model": "NVIDIA GeForce RTX 3070", "vram_gb": 8, "compute_capability": "8.6", "host": "b", "fail": True},
        {"model": "NVIDIA GeForce GTX 1650", "vram_gb": 4, "compute_capability": "7.5", "host": "a"}]}))
    return path


def test_zit_fleet_lists_a_lost_card_with_its_error_beside_the_healthy_ones(with_a_lost_card, capsys, no_tier_table):
    assert main(["fleet", "--fleet", str(with_a_lost_card), "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert [(c["index"], c["tier"], c["error"]) for c in cards] == [
        (0, "vram_12", None), (1, None, "NVMLError_GpuIsLost: GPU is lost"), (2, "vram_4", None)]
    assert main(["fleet", "--fleet", str(with_a_lost_card)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"\s+1\s+.*FAILED\s+NVMLError_GpuIsLost: GPU is lost\s+b", lines[2]), lines[2]
    assert "RTX 3060" in lines[1] and "GTX 1650" in lines[3]
    assert lines[-1] == "3 card(s): 1 x vram_4, 1 x vram_12, 1 x failed"


def test_a_lost_card_is_not_joined_and_says_why(with_a_lost_card, capsys, no_tier_table):
    nodes, skipped = nodes_for_cards(load_fleet(with_a_lost_card), with_a_lost_card)
    assert [n.card.index for n in nodes] == [0, 2]
    assert skipped == ["unknown card [index 1] failed (NVMLError_GpuIsLost: GPU is lost); check it with nvidia-smi: "
                       "not joined"]
    # zit node on the lost card's host: said, and nothing to join (no Ray started).
    assert main(["node", "--address", "127.0.0.1:1", "--fleet", str(with_a_lost_card), "--host", "b"]) == 2
    out = capsys.readouterr().out
    assert "skipped: unknown card [index 1] failed (NVMLError_GpuIsLost" in out and "error: no card here can serve" in out


@pytest.mark.parametrize("given, expected", [
    ("head", "head:6379"),
    ("10.0.0.5", "10.0.0.5:6379"),
    ("head:7000", "head:7000"),
    (" head ", "head:6379"),
    ("[fd00::1]", "[fd00::1]:6379"),
    ("[fd00::1]:7000", "[fd00::1]:7000"),
    ("fd00::1", "[fd00::1]:6379"),
])
def test_the_heads_address_gets_rays_port_when_it_names_none(given, expected):
    from runtime.nodes import with_default_port

    assert with_default_port(given) == expected


def test_cards_already_in_the_cluster_are_not_joined_again(mixed):
    from runtime.nodes import apply_splits, cards_to_join

    nodes, _ = nodes_for_cards(load_fleet(mixed), mixed)
    first, second, third = nodes[:3]
    present = {first.card.uuid: dict(first.labels),  # joined as it would join now
               second.card.uuid: {**second.labels, "zit/tier": "vram_4"}}  # joined as another tier
    missing, already, warnings = cards_to_join(nodes, present)
    assert [n.card.uuid for n in missing] == [n.card.uuid for n in nodes[2:]]
    assert already == [f"{first.card.name} [{first.card.uuid}] is already in the cluster as a {first.card.tier} node"]
    assert len(warnings) == 1 and f"joined earlier as vram_4 x 1; `zit down` first to serve it as " \
        f"{second.card.tier} x 1" in warnings[0]
    # A split card that joined whole is a different node too.
    split_nodes, _ = nodes_for_cards(apply_splits(load_fleet(mixed), ["RTX 4090=vram_12"]), mixed)
    whole = {n.card.uuid: dict(n.labels) for n in nodes}
    assert [n.card.tier for n in cards_to_join(split_nodes, whole)[0]] == []
    assert "x 2" in cards_to_join(split_nodes, whole)[2][0]
