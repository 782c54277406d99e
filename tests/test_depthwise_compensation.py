"""udfc+ past a depthwise Conv (issue 14 item 2): a pruned channel of the Conv before it is
removed from the depthwise Conv too, so the next channel-mixing Conv loses the depthwise
output channel; udfc+ rebuilds that one from the kept depthwise outputs (moments read after
the depthwise Conv and its activation) and folds it into the mixing Conv."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc import api
from tests.helpers import compensations, depthwise_block, node, random_feeds, run


def _output_error(original: onnx.ModelProto, compressed: onnx.ModelProto) -> float:
    feeds = random_feeds(original, batch=16, seed=5)
    (a,), (b,) = run(original, feeds), run(compressed, feeds)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _calibration() -> np.ndarray:
    """Inputs from the test inputs' distribution: the toy's BatchNorm statistics are random,
    so only measured moments describe what its layers really see."""
    return np.random.default_rng(9).standard_normal((64, 3, 12, 12)).astype(np.float32)


def test_udfc_plus_compensates_through_a_depthwise_conv():
    model = depthwise_block()
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      calibration=_calibration())
    onnx.checker.check_model(compressed, full_check=True)
    entry = compensations(report)["p"]
    assert entry["compensated"] and entry["through"] == ["dw"], entry
    assert entry["absorbers"] == ["c"]
    assert node(compressed, "dw").attribute  # the depthwise Conv stays, with fewer channels
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    assert _output_error(model, compressed) < 0.5 * _output_error(model, plain)


def test_the_paper_method_still_stops_at_the_depthwise_conv():
    _, report = api.compress(depthwise_block(), target="fake", prune=0.5, method="udfc")
    entry = compensations(report)["p"]
    assert not entry["compensated"] and "depthwise Conv 'dw'" in entry["reason"]
    assert "through" not in entry


def test_sequential_udfc_plus_fits_after_the_depthwise_conv():
    model = depthwise_block()
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      sequential=True, calibration=_calibration())
    entry = compensations(report)["p"]
    assert entry["compensated"] and entry["through"] == ["dw"], entry
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    assert _output_error(model, compressed) < 0.5 * _output_error(model, plain)


def test_a_depthwise_conv_with_a_shared_weight_is_not_crossed():
    _, report = api.compress(depthwise_block(shared_weight=True), target="fake", prune=0.5,
                             method="udfc+")
    entry = compensations(report)["p"]
    assert not entry["compensated"] and "'dw', whose weight is shared" in entry["reason"]
