"""udfc+ past a depthwise Conv (issue 14 item 2): a pruned channel of the Conv before it is
removed from the depthwise Conv too, so the next channel-mixing Conv loses the depthwise
output channel; udfc+ rebuilds that one from the kept depthwise outputs (moments read after
the depthwise Conv and its activation) and folds it into the mixing Conv."""

from __future__ import annotations

import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.channels.activations import activation_tensor, elementwise_pattern_end
from tests.helpers import (
    analysed,
    compensations,
    depthwise_block,
    node,
    output_errors,
    toy_calibration,
)


def _output_error(original: onnx.ModelProto, compressed: onnx.ModelProto) -> float:
    return output_errors(original, compressed)[0]


def test_udfc_plus_compensates_through_a_depthwise_conv():
    model = depthwise_block()
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      calibration=toy_calibration())
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
                                      sequential=True, calibration=toy_calibration())
    entry = compensations(report)["p"]
    assert entry["compensated"] and entry["through"] == ["dw"], entry
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    assert _output_error(model, compressed) < 0.5 * _output_error(model, plain)


def test_a_depthwise_conv_with_a_shared_weight_is_not_crossed():
    _, report = api.compress(depthwise_block(shared_weight=True), target="fake", prune=0.5,
                             method="udfc+")
    entry = compensations(report)["p"]
    assert not entry["compensated"] and "'dw', whose weight is shared" in entry["reason"]


def test_an_exported_hardswish_is_read_where_the_next_layer_reads():
    """Paddle writes HardSwish as x * clip(x + 3, 0, 6) / 6 (then a * h + b): the moments
    are read at its last op, which the next layer reads, not at the activation's input."""
    ctx = analysed(depthwise_block(activation="hardswish")).channels
    p, dw = node(ctx.model, "p"), node(ctx.model, "dw")
    assert activation_tensor(p, ctx) == "p_act"
    assert activation_tensor(p, ctx, (dw,)) == "dw_act"


def test_a_tensor_also_read_outside_the_pattern_ends_the_walk():
    """A residual Add (another computed tensor) reads the BN output too: no single end."""
    model = depthwise_block(activation="hardswish")
    bn = node(model, "p").output[0]
    bn = next(n for n in model.graph.node if bn in n.input).output[0]
    model.graph.node.append(onnx.helper.make_node("Add", [bn, "x_side"], ["res"], name="res"))
    model.graph.input.append(onnx.helper.make_tensor_value_info(
        "x_side", onnx.TensorProto.FLOAT, [None, 8, 12, 12]))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("res"))
    ctx = analysed(model).channels
    assert elementwise_pattern_end(ctx, bn) is None
    assert activation_tensor(node(ctx.model, "p"), ctx) == bn


def test_hardswish_export_compensates_through_the_depthwise_conv():
    model = depthwise_block(activation="hardswish")
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      calibration=toy_calibration())
    entry = compensations(report)["p"]
    assert entry["compensated"] and entry["through"] == ["dw"], entry
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    assert _output_error(model, compressed) < 0.5 * _output_error(model, plain)


@pytest.mark.parametrize("sequential", [False, True])
def test_channels_read_around_and_through_a_depthwise_conv_are_rebuilt_for_each(sequential):
    """An FPN lateral (``y_side``) reads ``p``'s activation beside the depthwise Conv: each
    route gets the reconstruction of what its absorber reads."""
    model = depthwise_block(side=True)
    compressed, report = api.compress(model, target="fake", prune=0.5, method="udfc+",
                                      sequential=sequential, calibration=toy_calibration())
    onnx.checker.check_model(compressed, full_check=True)
    entry = compensations(report)["p"]
    assert entry["compensated"] and entry["through"] == ["dw"], entry
    assert sorted(entry["absorbers"]) == ["c", "y_side"]
    plain, _ = api.compress(model, target="fake", prune=0.5, method="prune")
    for fitted, pruned in zip(output_errors(model, compressed), output_errors(model, plain),
                              strict=True):
        assert fitted < 0.5 * pruned
