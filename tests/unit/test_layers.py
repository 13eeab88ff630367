"""The layers contract (pyproject.toml [tool.importlinter], docs/architecture.md): `lint-imports` passes on the
project as it is and fails on a copy with one import that runs back up, or with Ray in the fleet knowledge."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "runtime", "deployments", "autoscaling", "cli", "bench")
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


@pytest.fixture()
def copy(tmp_path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.json",
                                                                                         "*.yaml", "static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_project_keeps_its_layers(copy):
    result = lint(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_back_up_inside_a_function_breaks_the_layers(copy):
    tiers = copy / "cluster" / "tiers.py"
    tiers.write_text(tiers.read_text() + "\n\ndef _config():\n    from deployments.config import ServiceConfig\n\n"
                     "    return ServiceConfig\n")
    result = lint(copy)
    assert result.returncode != 0
    assert "cluster is not allowed to import deployments" in result.stdout, result.stdout
    assert "cluster.tiers -> deployments.config" in result.stdout


def test_ray_in_the_fleet_knowledge_breaks_its_contract(copy):
    memory = copy / "cluster" / "memory.py"
    memory.write_text(memory.read_text() + "\n\nimport ray  # noqa: E402\n")
    result = lint(copy)
    assert result.returncode != 0 and "cluster.memory -> ray" in result.stdout, result.stdout
