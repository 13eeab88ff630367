"""Settings every test process shares: a private model cache and one Ray auth mode for the whole cluster."""

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports Ray: Ray workers inherit the driver's environment, so replicas see the same values.
os.environ.setdefault("ZIT_CACHE_DIR", tempfile.mkdtemp(prefix="zit-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from cluster.pipeline import resolve_model

    return resolve_model("tiny")
