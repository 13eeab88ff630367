"""What a Generator replica tells its tier's autoscaler (record_autoscaling_stats), on the tiny model without Ray."""

import asyncio
from pathlib import Path

import pytest

from cluster.requests import GenerationJob
from cluster.tiers import cpu_tier


@pytest.fixture(scope="module")
def generator():
    from deployments.generator import Generator

    return Generator(cpu_tier(), "tiny")


def test_busy_share_throughput_load_time_and_the_queue_the_ingress_sent(generator, monkeypatch):
    import deployments.generator as module

    generator.record_autoscaling_stats()  # start a fresh period
    idle = generator.record_autoscaling_stats()
    assert idle["busy_fraction"] == pytest.approx(0.0, abs=0.05) and idle["queued"] == 0.0
    job = GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=[1],
                        tier_queue=(3, 1234.0))
    asyncio.run(generator.generate(job))
    stats = generator.record_autoscaling_stats()
    assert 0.0 < stats["busy_fraction"] <= 1.0
    assert stats["units_per_s"] > 0 and stats["load_s"] == generator.load_seconds > 0
    assert (stats["queued"], stats["queued_units"]) == (3.0, 1234.0)
    monkeypatch.setattr(module, "QUEUE_SEEN_TTL_S", 0.0)  # no news from the ingress: the queue is forgotten
    assert generator.record_autoscaling_stats()["queued"] == 0.0


def test_a_wake_up_reports_the_queue_until_jobs_come(generator):
    asyncio.run(generator.wake(5, 999.0))
    stats = generator.record_autoscaling_stats()
    assert (stats["queued"], stats["queued_units"]) == (5.0, 999.0)


def test_a_card_nvml_lost_or_others_filled_is_reported_unusable_to_the_autoscaler(generator, tmp_path, monkeypatch):
    import os

    from cluster.memory import smallest_request
    from cluster.nvml import ZIT_SIM_STATE_DIR_ENV, FakeNvml, NvmlMonitor
    from cluster.profiles import default_profile

    monkeypatch.setenv(ZIT_SIM_STATE_DIR_ENV, str(tmp_path))
    nvml = FakeNvml(Path(__file__).resolve().parents[3] / "cluster" / "fleets" / "single-4gb.yaml")
    monitor = NvmlMonitor(nvml, indices=[0])
    monkeypatch.setattr(generator, "monitor", monitor)
    monkeypatch.setattr(generator, "profile", default_profile("vram_4", False))  # as a replica of that card's tier
    monkeypatch.setattr(generator, "_smallest_peak", smallest_request(generator.profile).total)
    card = nvml.cards[0]

    def unusable() -> float:
        monitor.refresh()
        return generator.record_autoscaling_stats()["card_unusable"]

    try:
        assert unusable() == 0.0
        nvml.set_lost(card)
        assert unusable() == 1.0
        nvml.set_lost(card, False)
        assert unusable() == 0.0
        # Another process (this test's parent) takes the card but for less than the smallest request needs.
        smallest = generator._smallest_peak
        total = monitor.latest()[0].memory_total
        nvml.update_state(card, os.getppid(), held=total - smallest + (1 << 20))
        assert unusable() == 1.0
        nvml.update_state(card, os.getppid(), held=total - smallest - (1 << 20))
        assert unusable() == 0.0
    finally:
        nvml.update_state(card, os.getppid(), held=0)
        monitor.close()
