"""A simulated host (cluster/simcard.py SimulatedHost) holds its replicas' host RAM, each shared weight set once,
and refuses a replica it cannot hold with the error a real host gives."""

import subprocess
import sys

import pytest

from cluster.nvml import FakeNvml
from cluster.simcard import SimulatedHost
from cluster.tiers import GIB


@pytest.fixture
def box(tmp_path):
    fleet = tmp_path / "box.yaml"
    fleet.write_text("name: box\nhost_ram_gb: {box: 16}\ncards:\n"
                     "  - {model: NVIDIA GeForce RTX 3060, vram_gb: 12, compute_capability: '8.6', host: box,"
                     " count: 2}\n")
    nvml = FakeNvml(fleet, state_dir=tmp_path / "state")
    return nvml


def other_process(nvml, private, shared):
    """Another live process holding `private` and `shared` on the host (a replica on the box's other card)."""
    code = ("import sys, json; from pathlib import Path; from cluster.nvml import FakeNvml; "
            "from cluster.simcard import SimulatedHost; "
            f"h = SimulatedHost(FakeNvml(Path({str(nvml.path)!r}), state_dir=Path({str(nvml.state_dir)!r})), 'box'); "
            f"h.hold({private}, json.loads(sys.argv[1]), 'a replica'); print('held', flush=True); sys.stdin.read()")
    import json

    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(shared)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_shared_set_counts_once_and_a_replica_that_does_not_fit_is_refused(box):
    host = SimulatedHost(box, "box")
    assert host.ram_bytes == 16 * GIB
    other = other_process(box, 2 * GIB, {"transformer:bfloat16": 11 * GIB})
    try:
        assert host.used() == 13 * GIB
        host.hold(2 * GIB, {"transformer:bfloat16": 11 * GIB}, "a second replica")  # maps the same copy: +2 GiB
        assert host.used() == 15 * GIB
        with pytest.raises(MemoryError, match=r"Cannot allocate memory: simulated host box has 16.0 GiB of RAM, its "
                                              r"other replicas hold 13.0 GiB and a third one needs 8.0 GiB more"):
            host.hold(2 * GIB, {"text_encoder:bfloat16": 6 * GIB}, "a third one")
        assert host.used() == 15 * GIB  # the refused hold left what this process held as it was
    finally:
        other.kill()
        other.wait()
    assert host.used() == 13 * GIB  # a process that has exited no longer counts
    host.release()
    assert host.used() == 0


def test_a_host_without_ram_in_the_fleet_file_is_not_checked(box):
    host = SimulatedHost(box, "elsewhere")
    host.hold(1000 * GIB, {}, "anything")
    assert host.ram_bytes is None and host.used() == 1000 * GIB
    host.release()


def test_ram_held_outside_the_cluster_counts_until_it_ends(box):
    """A program outside the cluster takes 10 GiB (a fault tests inject): a replica that fitted before is refused;
    when the program ends, it fits again. The other use outlives no process: it is the host's until set to 0."""
    host = SimulatedHost(box, "box")
    host.set_other_use(10 * GIB)
    assert host.used() == 10 * GIB
    with pytest.raises(MemoryError, match=r"its other replicas hold 10.0 GiB and a replica needs 8.0 GiB more"):
        host.hold(2 * GIB, {"transformer:bfloat16": 6 * GIB}, "a replica")
    host.set_other_use(0)
    host.hold(2 * GIB, {"transformer:bfloat16": 6 * GIB}, "a replica")
    assert host.used() == 8 * GIB
    host.release()
