"""The time model (cluster/speed.py): how predicted seconds move with the request, the card and the profile."""

import pytest

from cluster.memory import load_calibration
from cluster.profiles import DTYPE_BYTES, resolve_profile
from cluster.link import PCIE_BYTES_S
from cluster.speed import predict_seconds

# fp8 weights resident on the card; everything else as shipped.
RESIDENT = resolve_profile("vram_12", True)


def streamed(offload_stream):
    """RESIDENT with the same fp8 weights streamed block by block over PCIe instead."""
    return resolve_profile("vram_12", True, {"weights": "group_offload_block", "storage_dtype": "float8_e4m3fn",
                                             "offload_stream": offload_stream})


def seconds(width=1024, height=1024, n=1, steps=9, profile=RESIDENT, speed=1.0):
    return predict_seconds(width, height, n, steps, profile, speed, load_calibration())


def copy_per_step_s(profile):
    return load_calibration().transformer_params * DTYPE_BYTES[profile.transformer_storage] / PCIE_BYTES_S


@pytest.mark.parametrize("smaller, larger", [
    ({"width": 512, "height": 512}, {"width": 1024, "height": 1024}),
    ({"width": 1024, "height": 512}, {"width": 1024, "height": 1024}),
    ({"n": 1}, {"n": 2}),
    ({"n": 2}, {"n": 4}),
    ({"steps": 4}, {"steps": 9}),
    ({"steps": 9}, {"steps": 30}),
], ids=["pixels", "width only", "n 1-2", "n 2-4", "steps 4-9", "steps 9-30"])
@pytest.mark.parametrize("profile", [RESIDENT, streamed(True)], ids=["resident", "streamed"])
def test_more_pixels_images_or_steps_take_longer(smaller, larger, profile):
    assert seconds(profile=profile, **smaller).total_s < seconds(profile=profile, **larger).total_s


def test_a_resident_profile_runs_inversely_proportional_to_the_card_speed():
    # With the text encoder resident too, no term streams weights: every second is arithmetic on the card.
    profile = resolve_profile("vram_24", True, {"text_encoder": "gpu"})
    base = seconds(profile=profile, speed=1.0)
    for speed in (0.25, 0.5, 2.0):
        timing = seconds(profile=profile, speed=speed)
        assert timing.total_s == pytest.approx(base.total_s / speed)
        assert timing.per_step_s(9) == pytest.approx(base.per_step_s(9) / speed)


def test_an_offloaded_profile_pays_the_pcie_copy_every_step():
    steps = 9
    resident, offloaded = seconds(steps=steps), seconds(steps=steps, profile=streamed(False))
    assert offloaded.total_s > resident.total_s
    assert offloaded.denoise_s - resident.denoise_s == pytest.approx(steps * copy_per_step_s(RESIDENT))


def test_the_pcie_copy_does_not_get_faster_with_the_card():
    slow, fast = seconds(profile=streamed(False), speed=0.5), seconds(profile=streamed(False), speed=4.0)
    assert fast.per_step_s(9) > copy_per_step_s(RESIDENT)
    assert slow.denoise_s / fast.denoise_s < 4.0 / 0.5  # a card 8x as fast streams no faster


@pytest.mark.parametrize("side", [256, 1024, 2048], ids=["copy-bound", "mid", "compute-bound"])
def test_offload_stream_overlaps_the_copy_with_compute_instead_of_adding_it(side):
    compute = seconds(side, side).per_step_s(9)
    copy = copy_per_step_s(RESIDENT)
    assert {256: copy > compute, 2048: compute > copy}.get(side, True)  # the ids say true
    overlapped = seconds(side, side, profile=streamed(True)).per_step_s(9)
    serial = seconds(side, side, profile=streamed(False)).per_step_s(9)
    assert overlapped == pytest.approx(max(compute, copy))
    assert serial == pytest.approx(compute + copy)


def test_guided_steps_do_twice_the_arithmetic_and_encode_the_prompt_twice():
    """Classifier-free guidance runs the transformer on each image and its negative-prompt twin: a resident step
    takes twice as long, the text encoder runs twice (streaming its offloaded weights each time), decode is the same."""
    cal = load_calibration()
    plain = predict_seconds(1024, 1024, 2, 9, RESIDENT, 1.0, cal)
    guided = predict_seconds(1024, 1024, 2, 9, RESIDENT, 1.0, cal, cfg=True)
    assert guided.denoise_s == pytest.approx(2 * plain.denoise_s)
    assert guided.denoise_s == pytest.approx(predict_seconds(1024, 1024, 4, 9, RESIDENT, 1.0, cal).denoise_s)
    assert guided.encode_s == pytest.approx(2 * plain.encode_s)  # RESIDENT's text encoder is group-offloaded
    assert guided.decode_s == plain.decode_s


def test_guided_offloaded_steps_still_stream_the_weights_once():
    cal = load_calibration()
    plain = predict_seconds(256, 256, 1, 9, streamed(False), 1.0, cal)
    guided = predict_seconds(256, 256, 1, 9, streamed(False), 1.0, cal, cfg=True)
    compute = predict_seconds(256, 256, 1, 9, RESIDENT, 1.0, cal).per_step_s(9)
    assert guided.per_step_s(9) == pytest.approx(2 * compute + copy_per_step_s(RESIDENT))
    assert guided.per_step_s(9) - plain.per_step_s(9) == pytest.approx(compute)
