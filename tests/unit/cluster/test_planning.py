"""`zit plan` and `zit calibrate` (cluster/planning.py) through the real CLI, and the GPU script's dry run."""

import importlib.util
import json

import pytest
import torch

from cluster.cli import main
from cluster.memory import Calibration, largest_batch, load_calibration
from cluster.planning import default_tiers, plan, split_n
from cluster.profiles import default_profile
from cluster.tiers import VRAM_TIERS_GIB


def run_json(capsys, *argv):
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


def test_n_is_split_into_chunks_the_tier_holds():
    rows = {r["tier"]: r for r in plan(1024, 1024, 5)}
    for tier, (budget, bf16) in default_tiers().items():
        batch = largest_batch(1024, 1024, default_profile(tier, bf16), budget, load_calibration())
        chunks = rows[tier]["chunks"]
        assert sum(chunks) == 5 and max(chunks) <= batch and len(chunks) == -(-5 // batch)
    assert split_n(5, 2) == [2, 2, 1] and split_n(4, 4) == [4] and split_n(3, 1) == [1, 1, 1]


def test_typical_cards_decide_bf16_per_tier():
    tiers = default_tiers()
    assert not tiers["vram_4"][1] and not tiers["vram_6"][1]
    assert all(tiers[t][1] for t in ("vram_8", "vram_12", "vram_16", "vram_24"))


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_calibrate_without_cuda_exits_2_with_the_dry_run_hint(capsys):
    assert main(["calibrate"]) == 2
    assert "--dry-run" in capsys.readouterr().out


def test_calibrate_dry_run_on_cpu_with_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--model", "tiny", "--device", "cpu", "--dry-run", "--tiers", "vram_4,vram_12",
                 "--bf16", "no", "--sizes", "64,128", "--n", "1", "--out", str(out)])
    assert code == 0
    cal = Calibration.model_validate_json(out.read_text())
    assert cal.source == "estimate" and "dry run" in cal.notes and cal.torch == torch.__version__
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["profile"]["name"], r["width"]) for r in lines] == [
        ("vram_4-fp32", 64), ("vram_4-fp32", 128), ("vram_12-fp32", 64), ("vram_12-fp32", 128)]
    assert all(r["oom"] is False and r["finite"] and r["seconds"] > 0 for r in lines)


def test_gpu_script_dry_run_writes_the_calibration_and_log(tmp_path, repo_root, tiny_model_dir):
    spec = importlib.util.spec_from_file_location("gpu_calibrate", repo_root / "bench" / "gpu_calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tiers", "vram_4"]) == 0
    assert Calibration.model_validate_json((tmp_path / "calibration.json").read_text()).source == "estimate"
    runs = (tmp_path / "calibration.jsonl").read_text().splitlines()
    assert len(runs) == 4  # vram_4 and vram_4-fp32, each at 64x64 and 128x128
    assert all(json.loads(r)["oom"] is False for r in runs)


def test_memory_doc_matches_the_model(repo_root):
    spec = importlib.util.spec_from_file_location("memory_table", repo_root / "bench" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.main(["--check"]) == 0, "docs/memory.md is stale: run python bench/memory_table.py"
