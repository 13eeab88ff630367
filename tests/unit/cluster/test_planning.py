"""`zit plan` and `zit calibrate` (cluster/planning.py) through the real CLI, and the GPU script's dry run."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cluster.cli import load_service_config, main
from cluster.memory import Calibration, architecture_of, largest_batch, load_calibration
from cluster.nvml import load_fleet
from cluster.planning import (
    DEADLINE_MARGIN_S,
    DEADLINE_SAFETY,
    TimeBudget,
    default_tiers,
    full_size_pipeline_factory,
    model_architecture,
    plan,
    split_n,
)
from cluster.profiles import default_profile
from cluster.tiers import VRAM_TIERS_GIB, tiers_for_cards


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


# -- classifier-free guidance ----------------------------------------------------------------------------------------


def test_a_guided_batch_is_split_into_smaller_chunks_where_needed():
    """Guidance doubles the transformer's batch: at 1024x1024 the 12 GB tier holds 4 images per call unguided and
    only 2 guided; the 24 GB tier still holds 4."""
    cal = load_calibration()
    plain = {r["tier"]: r for r in plan(1024, 1024, 4, calibration=cal)}
    guided = {r["tier"]: r for r in plan(1024, 1024, 4, calibration=cal, cfg=True)}
    assert plain["vram_12"]["chunks"] == [4] and guided["vram_12"]["chunks"] == [2, 2]
    assert plain["vram_24"]["chunks"] == guided["vram_24"]["chunks"] == [4]
    for tier, (budget, bf16) in default_tiers().items():
        batch = largest_batch(1024, 1024, default_profile(tier, bf16), budget, cal, cfg=True)
        assert max(guided[tier]["chunks"], default=0) == min(batch, 4)
        assert guided[tier]["largest"]["n_at_size"] == batch <= plain[tier]["largest"]["n_at_size"]
        assert guided[tier]["peak_gb"] >= plain[tier]["peak_gb"] or guided[tier]["chunks"] != plain[tier]["chunks"]


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


# -- zit plan --config: the service's profiles ---------------------------------------------------------------------


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
    from deployments.routing import tier_plans, tier_profile

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


# -- zit calibrate --model PATH ------------------------------------------------------------------------------------


def test_calibrate_loads_the_model_folder_it_is_given(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """--model PATH is loaded with from_pretrained from that folder (never the tiny model under another name)."""
    import shutil

    from diffusers import ZImagePipeline

    folder = tmp_path / "my-zit"
    shutil.copytree(tiny_model_dir, folder)
    loaded = []
    original = ZImagePipeline.from_pretrained

    def spy(path, *args, **kwargs):
        loaded.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", spy)
    out = tmp_path / "cal.json"
    code = main(["calibrate", "--model", str(folder), "--device", "cpu", "--dry-run", "--tiers", "vram_4",
                 "--bf16", "no", "--sizes", "64", "--n", "1", "--out", str(out)])
    assert code == 0 and loaded and set(loaded) == {folder}
    assert f"model {folder}" in Calibration.model_validate_json(out.read_text()).notes
    assert str(folder) in capsys.readouterr().out


def test_calibrate_refuses_a_model_it_cannot_load_or_would_ignore(tmp_path, capsys):
    assert main(["calibrate", "--model", str(tmp_path), "--device", "cpu", "--dry-run"]) == 2
    assert "no model_index.json" in capsys.readouterr().out
    assert main(["calibrate", "--model", str(tmp_path), "--random-weights", "full", "--device", "cpu",
                 "--dry-run"]) == 2
    assert "would be ignored" in capsys.readouterr().out


def test_a_calibrated_folder_is_named_by_its_architecture():
    full = {"transformer_params": load_calibration().transformer_params}
    assert model_architecture("tiny", {"transformer_params": 1}) == "tiny"
    assert model_architecture("/models/zit", full) == "z-image-turbo"
    assert model_architecture("/models/my-distilled", {"transformer_params": 3}) == "my-distilled"


# -- the full-size path and the time budget ------------------------------------------------------------------------


def test_the_full_size_random_model_has_the_calibrated_architecture():
    """The pipelines `--random-weights full` calibrates, built on the meta device (no memory): every parameter count
    the memory model uses is the shipped calibration's, and the sizes FACTS.md gives (6.15 B transformer of 30 + 2 +
    2 blocks, Qwen3-4B, a 335 MB float32 Flux VAE)."""
    import torch

    pipe = full_size_pipeline_factory("meta")()
    assert pipe.transformer.device.type == "meta" and pipe.transformer.dtype == torch.bfloat16
    counts = architecture_of(pipe)
    cal = load_calibration()
    assert counts == {name: getattr(cal, name) for name in counts}
    assert round(counts["transformer_params"] / 1e9, 2) == 6.15 and counts["transformer_blocks"] == 34
    assert 3.9e9 < counts["text_encoder_params"] < 4.1e9
    assert round(counts["vae_params"] * 4 / 1e6) == 335


def test_time_budget_starts_a_profile_only_when_the_slowest_so_far_fits():
    now = [0.0]
    budget = TimeBudget(300.0, clock=lambda: now[0])
    assert budget.refuse(new_profile=True) is None  # nothing measured: only the margin is needed
    budget.profile_starts()
    now[0] = 40.0
    budget.run_took(25.0)
    now[0] = 100.0  # the first profile took 100 s; 200 s are left
    assert budget.refuse(new_profile=False) is None
    assert budget.refuse(new_profile=True) is None  # 100 x 1.25 + 20 = 145 <= 200
    budget.profile_starts()
    now[0] = 300.0 - (100 * DEADLINE_SAFETY + DEADLINE_MARGIN_S) + 1  # just too little left for another
    assert "slowest profile so far took 100 s" in budget.refuse(new_profile=True)
    assert budget.refuse(new_profile=False) is None  # a 25 s run still fits
    now[0] = 300.0 - (25 * DEADLINE_SAFETY + DEADLINE_MARGIN_S) + 1
    assert "slowest run so far took 25 s" in budget.refuse(new_profile=False)
    assert TimeBudget(None).refuse(new_profile=True) is None


def test_gpu_script_prints_and_writes_what_ended_when_it_is_stopped(tmp_path, repo_root, tiny_model_dir,
                                                                     monkeypatch, capsys):
    """SIGTERM (a call's timeout) in the middle of the third run: the two runs that ended are summarised and fitted."""
    import os
    import signal

    import cluster.planning as planning

    spec = importlib.util.spec_from_file_location("gpu_calibrate", repo_root / "bench" / "gpu_calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls, measure = [], planning.measure_run

    def measure_then_stop(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return measure(*args, **kwargs)

    monkeypatch.setattr(planning, "measure_run", measure_then_stop)
    before = signal.getsignal(signal.SIGTERM)
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tiers", "vram_4"]) == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the script's handler is gone again
    out = capsys.readouterr().out
    assert "STOPPED by SIGTERM" in out and "(stopped by SIGTERM)" in out
    summary = out.split("STOPPED by SIGTERM")[1]
    assert summary.count("vram_4") == 2  # the two runs that ended, and not the interrupted one
    assert len((tmp_path / "calibration.jsonl").read_text().splitlines()) == 2
    assert Calibration.model_validate_json((tmp_path / "calibration.json").read_text()).source == "estimate"


def test_gpu_script_skips_what_would_not_end_before_its_deadline(tmp_path, repo_root, tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("gpu_calibrate", repo_root / "bench" / "gpu_calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.DEFAULT_DEADLINE_S + DEADLINE_MARGIN_S < script.HARD_STOP_S < 8 * 60 - 30
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tiers", "vram_4", "--deadline-s",
                        str(DEADLINE_MARGIN_S - 1)]) == 0
    runs = [json.loads(line) for line in (tmp_path / "calibration.jsonl").read_text().splitlines()]
    assert len(runs) == 4 and all("time budget" in r["skipped"] for r in runs)
    assert "skipped: time budget" in capsys.readouterr().out
