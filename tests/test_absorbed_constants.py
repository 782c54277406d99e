"""The constant part of a udfc+ repair (a pruned channel's mean) goes into the absorber's bias
as the mean, over output positions, of what a constant input channel adds: every tap of a Conv
kernel, but only about ``kernel / stride`` taps per position for a ConvTranspose (a DBNet
head's up-sampling, a U-Net decoder)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc.channels.absorbers import absorbers
from onnx_udfc.core.io import tensor_array
from onnx_udfc.methods.plus import absorb_constants
from tests.helpers import Builder, analysed, image, node, session


def _model(op: str, k: int, stride: int) -> onnx.ModelProto:
    b = Builder(seed=2)
    h = b.relu(b.conv(image(b, hw=6), 3, 4, name="p"))
    if op == "ConvTranspose":
        b.output(b.conv_t(h, 4, 3, k=k, stride=stride, name="up"))
    else:
        b.output(b.conv(h, 4, 3, k=k, stride=stride, name="up"))
    return b.build()


def _mean_added(model: onnx.ModelProto, channel: int, value: float) -> np.ndarray:
    """What a constant ``value`` in ``channel`` of ``up``'s input adds to each of its output
    channels, averaged over positions (ONNX Runtime on ``up`` alone)."""
    up = node(model, "up")
    inits = [t for t in model.graph.initializer if t.name in up.input]
    graph = onnx.helper.make_graph(
        [up], "up", [onnx.helper.make_tensor_value_info(up.input[0], 1, [1, 4, 6, 6])],
        [onnx.helper.make_tensor_value_info(up.output[0], 1, None)], inits)
    sess = session(onnx.helper.make_model(graph, opset_imports=model.opset_import))
    x = np.zeros((1, 4, 6, 6), np.float32)
    base = sess.run(None, {up.input[0]: x})[0]
    x[0, channel] = value
    return (sess.run(None, {up.input[0]: x})[0] - base).mean((0, 2, 3))


@pytest.mark.parametrize(("op", "k", "stride"), [("Conv", 3, 1), ("ConvTranspose", 2, 2),
                                                 ("ConvTranspose", 3, 2)])
def test_an_absorbed_constant_is_the_mean_the_input_channel_added(op, k, stride):
    model = _model(op, k, stride)
    ctx = analysed(model).channels
    found, reason = absorbers(node(ctx.model, "p"), ctx, True)
    assert reason is None and [a.layer.node.name for a in found] == ["up"]
    expected = _mean_added(model, 1, 0.7)
    before = tensor_array(ctx.inits["up.bias"]).astype(np.float64).copy()
    classes = ctx.roots()[ctx.tensors[found[0].tensor].slots]
    assert absorb_constants(ctx, found, classes[[1]], np.array([0.7])) == []
    added = tensor_array(ctx.inits["up.bias"]).astype(np.float64) - before
    np.testing.assert_allclose(added, expected, rtol=1e-4, atol=1e-6)
