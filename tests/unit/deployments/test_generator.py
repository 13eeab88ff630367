"""A Generator replica on a simulated card (deployments/generator.py), on the tiny model without Ray: the card holds
each job to the memory model's peak for that job, as the real card would."""

import asyncio
from pathlib import Path

import pytest
import torch

from cluster.memory import predict_peak, resident_bytes
from cluster.nvml import FakeNvml, LocalCard
from cluster.profiles import default_profile
from cluster.requests import GenerationJob
from cluster.simcard import SimulatedCard
from cluster.tiers import cpu_tier

FLEET = Path(__file__).resolve().parents[3] / "cluster" / "fleets" / "single-4gb.yaml"


@pytest.fixture()
def on_gtx_1650(tmp_path, monkeypatch):
    """A tiny-model Generator made a replica of the 4 GB tier on the simulated GTX 1650 (3911 MiB, no bf16)."""
    import cluster.simcard
    from deployments.generator import Generator

    monkeypatch.setattr(cluster.simcard, "ZIT_SIM_TIME_SCALE", 0.0)  # no pacing: the test measures memory only
    generator = Generator(cpu_tier(), "tiny")
    nvml = FakeNvml(FLEET, state_dir=tmp_path)
    nvml.nvmlInit()
    profile = default_profile("vram_4", False)
    card = SimulatedCard(LocalCard(nvml.cards[0].uuid, 0, nvml, simulated=True))
    card.hold(resident_bytes(profile))
    generator.profile, generator.sim = profile, card
    yield generator
    card.release()


def job(side, guidance):
    return GenerationJob(prompt="a fox", width=side, height=side, steps=2, guidance_scale=guidance, seeds=[1])


def test_the_simulated_card_refuses_a_guided_job_that_the_same_job_unguided_fits(on_gtx_1650):
    """896x896 on the 4 GB tier: about 3.3 GiB unguided, about 4.2 GiB guided (the transformer runs the image and
    its negative-prompt twin), on a card of 3.82 GiB. The guided one fails as CUDA would, naming guidance."""
    generator = on_gtx_1650
    capacity = 3911 << 20
    assert predict_peak(896, 896, 1, generator.profile).total < capacity
    assert predict_peak(896, 896, 1, generator.profile, cfg=True).total > capacity
    images, _ = generator._compute(job(896, 0.0), generator.profile, lambda step, steps: None, None)
    assert len(images) == 1
    with pytest.raises(torch.OutOfMemoryError, match="guided"):
        generator._compute(job(896, 2.0), generator.profile, lambda step, steps: None, None)


def test_a_guided_job_counts_twice_the_work(on_gtx_1650, monkeypatch):
    """What the replica tells the autoscaler it gets through (work units per second): a guided job of the same size
    and time is twice the work (cluster.requests.work_units)."""
    from cluster.requests import work_units

    generator = on_gtx_1650

    async def one_second(job, profile):
        return [b""] * len(job.seeds), 1.0

    monkeypatch.setattr(generator, "_in_thread", one_second)
    asyncio.run(generator.generate(job(128, 0.0)))
    assert generator._units_per_s == work_units(128, 128, 1, 2)
    generator._units_per_s = None
    asyncio.run(generator.generate(job(128, 3.0)))
    assert generator._units_per_s == 2 * work_units(128, 128, 1, 2)


def test_a_replica_serve_stops_says_goodbye_to_the_fleet_registry_once(on_gtx_1650, monkeypatch):
    """Serve calls __del__ when it stops a replica on purpose; the replica leaves the registry then (its card's
    silence is no fault: deployments/registry.py), once, and waits for the registry to have it."""
    import ray

    import deployments.registry as registry_module
    import deployments.reporting as reporting_module

    forgotten, waited = [], []

    class Registry:
        class forget:  # the actor method's .remote()
            @staticmethod
            def remote(replica):
                forgotten.append(replica)
                return f"ref-{replica}"

    monkeypatch.setattr(reporting_module, "in_ray", lambda: True)
    monkeypatch.setattr(registry_module, "get_registry", lambda: Registry)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: waited.append((refs, timeout)) or (refs, []))
    generator = on_gtx_1650
    generator.__del__()
    generator.__del__()  # Serve's own call, then the garbage collector's
    assert forgotten == [generator.replica]
    assert waited == [([f"ref-{generator.replica}"], reporting_module.GOODBYE_WAIT_S)]
