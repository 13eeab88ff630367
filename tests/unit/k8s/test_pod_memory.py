"""The chart's worker pod memory (k8s/zit-cluster/files/pod-memory.json) is what k8s/pod_memory.py builds from the
host-memory model: the committed file has not drifted, and its figures are the model's."""

import importlib.util
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def load_module():
    spec = importlib.util.spec_from_file_location("zit_pod_memory", REPO / "k8s" / "pod_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_file_is_what_the_model_gives(capsys):
    module = load_module()
    assert module.OUT.read_text() == module.build(), "run `make chart-memory` and commit the result"
    assert module.main(["--check"]) == 0


def test_the_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    module = load_module()
    stale = tmp_path / "pod-memory.json"
    fresh = module.build()
    stale.write_text(re.sub(r'"ray_node_mib": \d+', '"ray_node_mib": 1', fresh))
    assert stale.read_text() != fresh
    monkeypatch.setattr(module, "OUT", stale)
    assert module.main(["--check"]) == 1 and "make chart-memory" in capsys.readouterr().out


def test_its_figures_are_the_host_memory_models():
    """vram_6 on a card without bf16, beside the stage: its own bytes and the bf16 transformer it maps."""
    from cluster.host_memory import replica_host
    from cluster.profiles import default_profile

    data = json.loads((REPO / "k8s/zit-cluster/files/pod-memory.json").read_text())
    entry = data["tiers"]["vram_6"]["fp32"]["stage"]
    estimate = replica_host(default_profile("vram_6", False).model_copy(update={"text_encoder": "stage"}))
    assert entry["own_mib"] == -(-(estimate.runtime + estimate.private) // 2**20)
    assert entry["shared_mib"] == {"transformer-leaves-bfloat16": -(-(6_154_908_736 - 10_900_992) * 2 // 2**20),
                                   "transformer-rest-float32": -(-10_900_992 * 4 // 2**20)}
