"""`zit plan` (cli/plan.py) through the real CLI: every tier, reasons, tables, fleets, guidance, service configs."""

import json

import pytest

from cli.main import main
from cluster.memory import load_calibration
from cluster.nvml import load_fleet
from cluster.tiers import VRAM_TIERS_GIB, tiers_for_cards
from deployments.config import load_service_config


def run_json(capsys, *argv):
    """(exit code, the tier rows) of `zit plan ARGV --json`."""
    code, out = run_plan(capsys, *argv)
    return code, out["tiers"]


def run_plan(capsys, *argv):
    """(exit code, the whole JSON object) of `zit plan ARGV --json`."""
    code = main(["plan", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_plan_1024_answers_for_every_tier(capsys):
    code, rows = run_json(capsys, "--size", "1024x1024", "--n", "1")
    assert code == 0
    assert [r["tier"] for r in rows] == list(VRAM_TIERS_GIB)
    for r in rows:
        assert {"fits", "peak_gb", "terms", "profile", "chunks", "reason", "largest"} <= set(r)
        assert (r["reason"] is None) == r["fits"]
        if r["fits"]:
            assert r["chunks"] == [1] and r["peak_gb"] == pytest.approx(r["terms"]["total"], abs=0.01)


def test_a_too_large_request_says_why_and_what_each_tier_takes(capsys):
    code, rows = run_json(capsys, "--size", "2048x2048", "--n", "1")
    no = [r for r in rows if not r["fits"]]
    assert no, "the 4 GB tier cannot hold 2048x2048 by the model"
    for r in no:
        assert "predicted peak" in r["reason"] and "budget" in r["reason"]
        assert 0 < r["largest"]["side_at_n1"] < 2048 and r["largest"]["n_at_size"] == 0
    assert code == 0  # some tier fits


def test_steps_above_the_limit_are_a_reason(capsys):
    code, rows = run_json(capsys, "--size", "512x512", "--steps", "60")
    assert code == 1 and all("max_steps" in r["reason"] for r in rows)


def test_plan_prints_a_table_with_every_tier(capsys):
    assert main(["plan", "--size", "2048x2048", "--n", "2"]) == 0
    out = capsys.readouterr().out
    for tier in VRAM_TIERS_GIB:
        assert f"\n{tier} " in out
    assert "vram_4: predicted peak" in out


@pytest.mark.parametrize("size, says", [("1000x1000", "multiple of 16"), ("big", "look like '1024x1024'"),
                                        ("4096x4096", "between 64 and 2048")])
def test_a_bad_size_is_refused_with_the_rule(size, says, capsys):
    assert main(["plan", "--size", size]) == 2
    assert says in capsys.readouterr().out


def test_plan_for_a_fleet_file_uses_its_cards(repo_root, capsys):
    """The mixed fleet's GTX 1650 reports 3911 MiB and no bf16: the 4 GB tier is planned for that card."""
    code, rows = run_json(capsys, "--size", "1024x1024", "--fleet", str(repo_root / "cluster/fleets/mixed.yaml"))
    by_tier = {r["tier"]: r for r in rows}
    assert code == 0 and set(by_tier) == {"vram_4", "vram_6", "vram_8", "vram_12", "vram_24"}
    assert by_tier["vram_4"]["vram_gb"] == round(3911 / 1024, 2) and by_tier["vram_4"]["bf16"] is False
    assert by_tier["vram_12"]["bf16"] is True


def test_plan_guidance_option_plans_guided_and_says_so(capsys):
    code, rows = run_json(capsys, "--size", "1024x1024", "--n", "4", "--guidance", "3.5")
    by_tier = {r["tier"]: r for r in rows}
    assert code == 0 and all(r["cfg"] for r in rows)
    assert by_tier["vram_12"]["chunks"] == [2, 2]
    assert not by_tier["vram_4"]["fits"] and "classifier-free guidance" in by_tier["vram_4"]["reason"]
    assert main(["plan", "--size", "1024x1024", "--guidance", "2"]) == 0
    assert "guidance 2 (classifier-free" in capsys.readouterr().out
    code, rows = run_json(capsys, "--size", "1024x1024", "--n", "4")
    assert not any(r["cfg"] for r in rows) and {r["tier"]: r for r in rows}["vram_12"]["chunks"] == [4]


@pytest.mark.parametrize("guidance", ["-1", "20.5"])
def test_plan_refuses_a_guidance_no_request_may_carry(guidance, capsys):
    assert main(["plan", "--guidance", guidance]) == 2
    assert f"--guidance {float(guidance):g}" in capsys.readouterr().out


def write_config(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_with_a_config_applies_its_tier_overrides(tmp_path, capsys):
    config = write_config(tmp_path / "gpu.yaml", {"tiers": [{"name": "vram_12", "profile": {"max_n": 1}}]})
    _, plain = run_json(capsys, "--size", "1024x1024", "--n", "4")
    code, overridden = run_json(capsys, "--size", "1024x1024", "--n", "4", "--config", str(config))
    plain, overridden = ({r["tier"]: r for r in rows} for rows in (plain, overridden))
    assert code == 0 and set(overridden) == set(VRAM_TIERS_GIB)
    assert plain["vram_12"]["chunks"] == [4] and overridden["vram_12"]["chunks"] == [1, 1, 1, 1]
    assert overridden["vram_12"]["largest"]["n_at_size"] == 1
    for tier in set(VRAM_TIERS_GIB) - {"vram_12"}:
        assert overridden[tier] == plain[tier]


def test_plan_with_a_config_and_a_fleet_agrees_with_the_ingress(tmp_path, repo_root, capsys):
    """The tiers `zit up --config FILE --fleet F` serves, their profiles as the ingress builds them (tier_profile,
    with the LoRA reserve) and the ingress's own tier plans: `zit plan` gives the same chunks and reasons."""
    from cluster.profiles import tier_profile
    from deployments.routing import tier_plans

    fleet = repo_root / "cluster" / "fleets" / "mixed.yaml"
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    config = write_config(tmp_path / "gpu.yaml", {
        "lora_dir": str(lora_dir), "lora_slots": 2, "lora_reserve_params": 1_000_000_000,
        "tiers": [{"name": "vram_8", "profile": {"weights": "group_offload_leaf"}},
                  {"name": "vram_24", "profile": {"max_n": 2}}]})
    code, rows = run_json(capsys, "--size", "1536x1536", "--n", "3", "--config", str(config), "--fleet", str(fleet))
    service = load_service_config(config, {})
    tiers = tiers_for_cards(load_fleet(fleet), service.tiers)
    reserve = service.lora_settings().reserved_params
    profiles = {t.name: tier_profile(t, reserve) for t in tiers}
    expected = tier_plans(tiers, profiles, 1536, 1536, 9, 3, load_calibration())
    assert code == 0 and [r["tier"] for r in rows] == [p.tier for p in expected]
    for row, want in zip(rows, expected):
        assert (row["chunks"], row["reason"], row["profile"]) == (want.chunks, want.reason, want.profile.name)
    by_tier = {r["tier"]: r for r in rows}
    assert by_tier["vram_24"]["chunks"] == [2, 1] and "leaf offload" in by_tier["vram_8"]["technique"]
    # The 2 x 1 B-parameter LoRA reserve (4 GB in bf16) is what pushes the 12 GB tier out at this size.
    _, plain = run_json(capsys, "--size", "1536x1536", "--n", "3", "--fleet", str(fleet))
    assert {r["tier"]: r for r in plain}["vram_12"]["fits"] and not by_tier["vram_12"]["fits"]


def test_plan_with_a_config_the_service_would_refuse_says_why(tmp_path, capsys):
    bad_knob = write_config(tmp_path / "bad.yaml", {"tiers": [{"name": "vram_12", "profile": {"max_nn": 1}}]})
    assert main(["plan", "--config", str(bad_knob)]) == 2
    assert "unknown profile knob(s) ['max_nn']" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiers: [\n")
    assert main(["plan", "--config", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().out
    assert main(["plan", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().out


def test_plan_one_box_reports_the_hosts_ram_need_and_what_it_has(repo_root, capsys):
    """The issue's check: each host's need against its RAM, at most 32 GiB on one-box.yaml's single host with all
    five cards (the offloading tiers' transformer in 8 bits, said with the reason)."""
    code, out = run_plan(capsys, "--fleet", str(repo_root / "cluster/fleets/one-box.yaml"), "--size", "1024x1024",
                         "--n", "1")
    assert code == 0
    (box,) = out["hosts"]
    assert box["host"] == "box" and box["ram_gb"] == 32.0 and box["fits"] and box["need_gb"] <= 32.0
    assert box["head"] and box["ray_nodes"] == len(box["replicas"]) - 1  # the stage shares its card's node
    assert {r["what"] for r in box["replicas"]} >= {"text-encoder stage", "vram_24 on NVIDIA GeForce RTX 4090"}
    assert not box["left_out"] and len(box["replicas"]) == 6
    assert [c.split(":")[0] for c in box["changed"]] == ["vram_4", "vram_6"]
    assert all("host box has 32.0 GiB" in c for c in box["changed"])
    planned = {r["tier"]: r for r in out["tiers"]}
    assert len(planned) == 5 and "fp8 storage" in planned["vram_4"]["technique"]
    assert main(["plan", "--fleet", str(repo_root / "cluster/fleets/one-box.yaml")]) == 0
    text = capsys.readouterr().out
    assert "box: needs" in text and "has 32.0 GiB  ok" in text and "changed: vram_4: " in text
    assert "shared once: " in text and "left out: " not in text


def test_plan_without_a_fleet_has_no_hosts(capsys):
    code, out = run_plan(capsys, "--size", "512x512")
    assert code == 0 and out["hosts"] == [] and "give --fleet" in out["text_encoder"]
