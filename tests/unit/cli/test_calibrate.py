"""`zit calibrate` (cli/calibrate.py) through the real CLI: dry runs on the CPU, the model it loads, refusals."""

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from cluster.memory import Calibration


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
