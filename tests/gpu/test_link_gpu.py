"""The host-to-device copy rate a replica times when it starts (cluster/link.py measure_copy_rate), on a real card:
it is within what the card's PCIe link allows by NVML, and it leaves nothing allocated. Runs only where CUDA exists;
skipped elsewhere."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]


def test_the_timed_copy_is_within_the_links_rate_and_frees_its_buffers():
    import pynvml

    from cluster.link import link_of, measure_copy_rate
    from cluster.nvml import read_card

    before = torch.cuda.memory_allocated()
    measured = measure_copy_rate("cuda")
    assert torch.cuda.memory_allocated() == before
    pynvml.nvmlInit()
    try:
        card = read_card(pynvml, torch.cuda.current_device())
    finally:
        pynvml.nvmlShutdown()
    nominal = link_of(card)
    assert nominal.source == "pcie", "NVML reports no PCIe link for this card"
    # A pinned copy sustains most of the lane rate (LINK_EFFICIENCY 0.8) and never more than the raw lanes give.
    assert 0.3 * nominal.bytes_s < measured < nominal.bytes_s / 0.8 * 1.05, (measured, nominal)
    assert link_of(card, measured).source == "measured"
