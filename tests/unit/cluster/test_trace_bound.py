"""The memory model never predicts below the fake-tensor trace of the full-size model (cluster/trace.py, recorded in
the shipped calibration by `zit calibrate --trace`) plus what a trace cannot see, for every traced cell; and a few
cells traced again now still give what was recorded (a diffusers or torch change that moves them fails here)."""

import pytest

from cluster.calibrate import describe_cell, grid_cell, trace_cell, trace_jobs
from cluster.memory import (
    CUBLAS_WORKSPACE_BYTES,
    DEFAULT_CALIBRATION,
    GIB,
    TRACED_TERMS,
    TracedCell,
    TracedFigures,
    load_calibration,
    predicted_beside_weights,
    trace_floor,
    unseen_by_trace,
    with_trace,
)

CAL = load_calibration(DEFAULT_CALIBRATION)


def test_the_shipped_calibration_holds_the_whole_traced_grid():
    assert CAL.traced is not None, "run `zit calibrate --trace --out cluster/calibration/default.json`"
    recorded = {describe_cell(c) for c in CAL.traced.cells}
    wanted = {describe_cell(grid_cell(phase, kwargs)) for phase, kwargs in trace_jobs()}
    assert wanted <= recorded, sorted(wanted - recorded)[:5]


def test_the_model_predicts_at_least_the_traced_bytes_plus_the_unseen_parts_in_every_cell():
    short = [f"{describe_cell(c)}: model {predicted_beside_weights(c, CAL) / GIB:.3f} GiB < floor "
             f"{trace_floor(c, CAL) / GIB:.3f} GiB" for c in CAL.traced.cells
             if predicted_beside_weights(c, CAL) < trace_floor(c, CAL)]
    assert not short, short[:10]


def test_the_unseen_parts_are_named_and_sized():
    cell = CAL.traced.cells[0]
    parts = unseen_by_trace(cell, CAL)
    assert set(parts) == {"cuda_context", "cublas_workspace", "allocator_rounding"}
    assert parts["cuda_context"] + parts["cublas_workspace"] == CAL.context_bytes
    assert parts["cublas_workspace"] == CUBLAS_WORKSPACE_BYTES and parts["allocator_rounding"] == cell.rounding_bytes
    assert any(c.rounding_bytes > 0 for c in CAL.traced.cells)  # the trace counted the allocator's rounding


@pytest.mark.parametrize("term", TRACED_TERMS)
def test_each_term_alone_holds_the_trace_and_a_model_without_it_fails_the_check(term):
    """Every traced term is at least the trace's bound (the margin stays for what nothing counts); with the term at
    zero some cell breaks: the check above can fail."""
    assert getattr(CAL, term) >= CAL.traced.bounds[term] > 0
    weak = CAL.model_copy(update={term: 0})
    assert any(predicted_beside_weights(c, weak) < trace_floor(c, weak) for c in CAL.traced.cells)


def test_tracing_raises_only_the_terms_below_the_bound_and_says_so():
    cells = [TracedCell(phase="denoise", compute_dtype="bfloat16", width=1024, height=1024, n=1,
                        peak_bytes=int(3 * GIB), rounding_bytes=1 << 20),
             TracedCell(phase="encode", compute_dtype="bfloat16", peak_bytes=1 << 20, rounding_bytes=1 << 20)]
    base = CAL.model_copy(update={"traced": None, "term_sources": {}})
    traced = with_trace(base, TracedFigures(date="2026-12-03", torch="t", diffusers="d", seconds=1.0, cells=cells))
    assert traced.activation_bytes_per_token > base.activation_bytes_per_token
    assert traced.term_source("activation_bytes_per_token") == "traced"
    assert traced.text_encoder_activation_bytes == base.text_encoder_activation_bytes
    assert traced.term_source("text_encoder_activation_bytes") == base.source
    assert all(predicted_beside_weights(c, traced) >= trace_floor(c, traced) for c in cells)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_cell_traced_again_gives_what_the_calibration_recorded(index):
    """Quick cells of each phase, traced now with this torch and diffusers: within 2 % of the recorded figure."""
    wanted = [("encode", {"compute_dtype": "bfloat16"}),
              ("denoise", {"width": 512, "height": 512, "n": 1, "cfg": False, "compute_dtype": "bfloat16"}),
              ("decode", {"width": 1024, "height": 1024, "n": 1, "compute_dtype": "bfloat16", "tiling": False,
                          "tile_px": 1024, "slicing": True})][index]
    cell, _ = trace_cell(*wanted)
    [recorded] = [c for c in CAL.traced.cells if describe_cell(c) == describe_cell(cell)]
    assert cell.peak_bytes == pytest.approx(recorded.peak_bytes, rel=0.02)
    assert cell.rounding_bytes == pytest.approx(recorded.rounding_bytes, rel=0.02, abs=1 << 20)


def test_the_weights_term_holds_the_upcast_copies_layerwise_casting_makes():
    """With layerwise casting (fp8 leaves on bf16 cards, bf16 leaves on float32 cards) the hooks upcast one leaf at a
    time: the model's weights count one leaf in the compute dtype (cluster/memory.py `_transformer_running`, the
    encoder's `_text_encoder_bytes`), at least what the trace saw live."""
    from cluster.profiles import DTYPE_BYTES

    cast = [c for c in CAL.traced.cells if c.storage_dtype]
    assert {(c.phase, c.compute_dtype) for c in cast} == {("denoise", "bfloat16"), ("denoise", "float32"),
                                                          ("encode", "float32")}
    for c in cast:
        leaf = CAL.transformer_leaf_params if c.phase == "denoise" else CAL.text_encoder_leaf_params
        assert 0 < c.weight_copies_bytes <= leaf * DTYPE_BYTES[c.compute_dtype], describe_cell(c)
