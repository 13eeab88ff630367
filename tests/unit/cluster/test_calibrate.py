"""Measuring the memory model (cluster/calibrate.py): the GPU script's dry run and stop, architectures, the time budget."""

import importlib.util
import json

from cluster.calibrate import (
    DEADLINE_MARGIN_S,
    DEADLINE_SAFETY,
    TimeBudget,
    full_size_pipeline_factory,
    model_architecture,
)
from cluster.memory import Calibration, architecture_of, load_calibration


def test_gpu_script_dry_run_writes_the_calibration_and_log(tmp_path, repo_root, tiny_model_dir):
    spec = importlib.util.spec_from_file_location("gpu_calibrate", repo_root / "bench" / "gpu_calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tiers", "vram_4"]) == 0
    assert Calibration.model_validate_json((tmp_path / "calibration.json").read_text()).source == "estimate"
    runs = (tmp_path / "calibration.jsonl").read_text().splitlines()
    assert len(runs) == 4  # vram_4 and vram_4-fp32, each at 64x64 and 128x128
    assert all(json.loads(r)["oom"] is False for r in runs)


def test_a_calibrated_folder_is_named_by_its_architecture():
    full = {"transformer_params": load_calibration().transformer_params}
    assert model_architecture("tiny", {"transformer_params": 1}) == "tiny"
    assert model_architecture("/models/zit", full) == "z-image-turbo"
    assert model_architecture("/models/my-distilled", {"transformer_params": 3}) == "my-distilled"


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

    import cluster.calibrate as planning

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
