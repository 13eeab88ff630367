"""The NVML wrapper on the fake backend, and the fake itself: same calls, shapes and errors as nvidia-ml-py."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pynvml
import pytest
import yaml
from pydantic import ValidationError

from cluster.nvml import FakeNvml, NvmlMonitor, NvmlUnavailable, load_fleet, probe

MIB = 1 << 20


def fleet_file(tmp_path, cards, name="test"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "cards": cards}))
    return path


CARDS = [
    {"model": "NVIDIA GeForce GTX 1650", "vram_gb": 4, "memory_total_mib": 3911, "compute_capability": "7.5",
     "speed": 0.08, "host": "a"},
    {"model": "NVIDIA GeForce RTX 3060", "vram_gb": 12, "compute_capability": "8.6", "speed": 0.35, "host": "a",
     "foreign_memory_mib": 1024},
]


@pytest.fixture()
def fake(tmp_path):
    return FakeNvml(fleet_file(tmp_path, CARDS), state_dir=tmp_path / "state")


def test_probe_reads_every_card_through_the_nvml_calls(fake):
    first, second = probe(fake)
    assert (first.name, first.memory_total, first.compute_capability, first.bf16, first.tier) == (
        "NVIDIA GeForce GTX 1650", 3911 * MIB, (7, 5), False, "vram_4")
    assert (second.tier, second.bf16, second.host, second.speed, second.simulated) == ("vram_12", True, "a", 0.35, True)
    assert second.foreign_memory == 1024 * MIB and second.memory_used == 1024 * MIB
    assert second.memory_free == 11 * 1024 * MIB
    assert first.uuid.startswith("GPU-") and first.uuid != second.uuid
    assert first.temperature_c is not None and first.power_w > 0 and first.utilization_pct == 0


def test_uuids_are_stable_across_loads(tmp_path):
    path = fleet_file(tmp_path, CARDS)
    assert [c.uuid for c in load_fleet(path)] == [c.uuid for c in load_fleet(path)]


def test_count_repeats_a_card(tmp_path):
    cards = load_fleet(fleet_file(tmp_path, [{**CARDS[0], "count": 3}]))
    assert [c.index for c in cards] == [0, 1, 2] and len({c.uuid for c in cards}) == 3


def test_calls_before_init_fail_like_nvml(fake):
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()


def test_a_lost_card_fails_with_gpu_is_lost(tmp_path):
    fake = FakeNvml(fleet_file(tmp_path, [{**CARDS[0], "fail": True}]), state_dir=tmp_path / "s")
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetMemoryInfo(fake.nvmlDeviceGetHandleByIndex(0))


def test_probe_lists_a_lost_card_with_its_error_and_still_reads_the_others(tmp_path):
    fake = FakeNvml(fleet_file(tmp_path, [{**CARDS[0], "fail": True}, CARDS[1]]), state_dir=tmp_path / "s")
    lost, healthy = probe(fake)
    assert lost.error == "NVMLError_GpuIsLost: GPU is lost"
    assert (lost.index, lost.tier, lost.memory_total, lost.host, lost.simulated) == (0, None, 0, "a", True)
    assert healthy.error is None and healthy.tier == "vram_12" and healthy.memory_total == 12 * 1024 * MIB
    assert lost.to_dict()["error"] == lost.error and healthy.to_dict()["error"] is None


def test_memory_of_graphics_processes_is_foreign_memory_too(tmp_path):
    fake = FakeNvml(fleet_file(tmp_path, [{**CARDS[1], "graphics_memory_mib": 512}]), state_dir=tmp_path / "s")
    (card,) = probe(fake)
    assert card.foreign_memory == card.memory_used == (1024 + 512) * MIB  # the compute process and the desktop


def test_a_process_in_both_lists_counts_once(tmp_path):
    class BothKinds(FakeNvml):  # every compute process also has a graphics context (CUDA + OpenGL)
        def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
            return self.nvmlDeviceGetComputeRunningProcesses(handle)

    (card,) = probe(BothKinds(fleet_file(tmp_path, [CARDS[1]]), state_dir=tmp_path / "s"))
    assert card.foreign_memory == 1024 * MIB


def test_unknown_process_memory_counts_as_everything_used_but_our_own(tmp_path):
    """usedGpuMemory None (NVML cannot tell) is not zero: the foreign share is then all used memory that our own
    processes are not known to hold, so a card is never taken for emptier than it is."""
    class HidesForeignMemory:  # the fake as NVML on Windows WDDM: no memory reading for the foreign process
        def __init__(self, fake):
            self.fake = fake

        def __getattr__(self, name):
            return getattr(self.fake, name)

        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if p.pid == 0 else p.usedGpuMemory)
                    for p in self.fake.nvmlDeviceGetComputeRunningProcesses(handle)]

    fake = FakeNvml(fleet_file(tmp_path, [CARDS[1]]), state_dir=tmp_path / "s")
    fake.nvmlInit()
    fake.update_state(fake.nvmlDeviceGetHandleByIndex(0), os.getpid(), held=2048 * MIB)
    (card,) = probe(HidesForeignMemory(fake), own_pids=frozenset({os.getpid()}))
    assert card.memory_used == (1024 + 2048) * MIB  # the fake's driver still knows the real total
    assert card.foreign_memory == 1024 * MIB  # used minus our own 2 GiB, not 0


def test_no_driver_gives_a_clear_message():
    class NoDriver:
        def nvmlInit(self):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    with pytest.raises(NvmlUnavailable, match="zit up --fleet"):
        probe(NoDriver())


def test_real_probe_without_a_driver_is_unavailable_not_a_crash():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        with pytest.raises(NvmlUnavailable):
            probe()
    else:
        pynvml.nvmlShutdown()
        assert all(card.memory_total > 0 for card in probe())


def test_memory_held_by_a_process_is_seen_by_every_process(fake, tmp_path):
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    fake.update_state(handle, os.getpid(), held=512 * MIB, busy=True)
    other_view = FakeNvml(fake.path, state_dir=fake.state_dir)  # what another process reads
    card = probe(other_view)[0]
    assert card.memory_used == 512 * MIB and card.utilization_pct == 100
    assert probe(other_view, own_pids=frozenset({os.getpid()}))[0].foreign_memory == 0


def test_memory_of_an_exited_process_is_released(fake):
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    fake.update_state(handle, child.pid, held=1024 * MIB)
    assert probe(fake)[0].memory_used == 0


def test_monitor_serves_cached_readings_without_calling_nvml(fake):
    calls = []
    original = fake.nvmlDeviceGetMemoryInfo

    def counted(handle):
        calls.append(time.monotonic())
        return original(handle)

    fake.nvmlDeviceGetMemoryInfo = counted
    monitor = NvmlMonitor(fake, period_s=3600)
    try:
        before = len(calls)
        for _ in range(100):
            assert len(monitor.latest()) == 2
        assert len(calls) == before
    finally:
        monitor.close()


def test_monitor_reports_a_failing_card_instead_of_crashing(tmp_path):
    path = fleet_file(tmp_path, CARDS)
    fake = FakeNvml(path, state_dir=tmp_path / "s")
    monitor = NvmlMonitor(fake, period_s=3600)
    try:
        fake.cards[1].spec = fake.cards[1].spec.model_copy(update={"fail": True})
        monitor.refresh()
        assert monitor.latest() == [] and "GpuIsLost" in monitor.error
    finally:
        monitor.close()


@pytest.mark.parametrize(
    "card, says",
    [
        ({**CARDS[0], "bf16": True}, "bf16=true needs compute capability >= 8.0"),
        ({**CARDS[0], "vram": 4}, "vram"),
        ({**CARDS[0], "compute_capability": "seven"}, "compute_capability"),
        ({**CARDS[0], "host": "has spaces"}, "host"),
    ],
)
def test_bad_fleet_files_name_the_problem(tmp_path, card, says):
    with pytest.raises(ValidationError, match=says):
        load_fleet(fleet_file(tmp_path, [card]))


@pytest.mark.parametrize("name, cards, tiers", [
    ("mixed", 5, {"vram_4", "vram_6", "vram_8", "vram_12", "vram_24"}),
    ("single-4gb", 1, {"vram_4"}),
    ("large", 48, {"vram_4", "vram_6", "vram_8", "vram_12", "vram_16", "vram_24"}),
])
def test_shipped_fleets(repo_root, name, cards, tiers):
    fleet = load_fleet(repo_root / "cluster" / "fleets" / f"{name}.yaml")
    assert len(fleet) == cards and {c.tier for c in fleet} == tiers
