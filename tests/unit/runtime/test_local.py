"""How the Ray processes this project starts are tuned (runtime/local.py RAY_PROCESS_ENV), the same everywhere."""

import os
import re

from runtime.local import RAY_PROCESS_ENV, ensure_ray_process_env


def test_the_ray_process_env_fills_gaps_and_keeps_the_operators_values(monkeypatch):
    for key in RAY_PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    ensure_ray_process_env()
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert os.environ["RAY_max_direct_call_object_size"] == RAY_PROCESS_ENV["RAY_max_direct_call_object_size"]
    assert int(RAY_PROCESS_ENV["RAY_max_direct_call_object_size"]) > 4 * 1024 * 1024  # a 1024x1024 chunk fits
    assert os.environ["RAY_JEMALLOC_LIB_PATH"] == ""  # set, and empty: Ray preloads no jemalloc


def test_ray_starts_its_processes_without_jemalloc_under_this_env(monkeypatch):
    from ray._private.services import JEMALLOC_SO, RAY_JEMALLOC_LIB_PATH, propagate_jemalloc_env_var

    for key in RAY_PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    # What Ray's launcher does for the raylet, the GCS and the agents (ray._private.services.start_ray_process):
    # by default it preloads its bundled jemalloc ...
    assert "LD_PRELOAD" in propagate_jemalloc_env_var(jemalloc_path=JEMALLOC_SO, jemalloc_conf="", jemalloc_comps=[],
                                                      process_type="raylet")
    # ... and under this project's env it does not.
    ensure_ray_process_env()
    path = os.environ.get(RAY_JEMALLOC_LIB_PATH, JEMALLOC_SO)
    assert propagate_jemalloc_env_var(jemalloc_path=path, jemalloc_conf="", jemalloc_comps=[],
                                      process_type="raylet") == {}


def test_the_gpu_image_sets_the_same_values(repo_root):
    dockerfile = (repo_root / "Dockerfile.gpu").read_text()
    env_block = dockerfile[dockerfile.index("\nENV "):]
    env_block = env_block[:env_block.index("\n\n")]
    values = {key: value.strip('"') for key, value in re.findall(r"(\w+)=(\S+?)\s*\\?$", env_block, flags=re.M)}
    assert {key: values.get(key) for key in RAY_PROCESS_ENV} == RAY_PROCESS_ENV
