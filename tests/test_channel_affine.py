"""Per-channel constant Mul/Add after a BatchNorm or a Conv (Caffe2-era exports) folded into it
(onnx_udfc.core.affine), so that compensation crosses them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.core.affine import fold_channel_affine
from tests.helpers import Builder, compensations, max_diff


def caffe2_block(with_bn: bool, const_shape: tuple[int, ...] = (8, 1, 1),
                 extra_reader: bool = False, rank: int = 4) -> onnx.ModelProto:
    """conv0 [-> BN] -> Mul(const) -> Add(const) -> Relu -> conv1."""
    b = Builder(seed=4)
    if rank == 4:
        x = b.input("x", ["N", 3, 8, 8])
        h = b.conv(x, 3, 8, name="conv0")
    else:
        x = b.input("x", ["N", 3, 8])
        h = b.op("Conv", [x, b.weight("conv0.weight", [8, 3, 3])], "conv0", pads=[1, 1])
    if with_bn:
        h = b.bn(h, 8, name="bn")
    scale = b.const(b.rng.uniform(0.5, 2.0, const_shape), "mul_const")
    shift = b.const(0.1 * b.rng.standard_normal(const_shape), "add_const")
    h = b.relu(b.op("Add", [b.op("Mul", [h, scale], "mul"), shift], "add"))
    if rank == 4:
        b.output(b.conv(h, 8, 4, name="conv1"))
    else:
        b.output(b.op("Conv", [h, b.weight("conv1.weight", [4, 8, 1])], "conv1"))
    if extra_reader:
        b.output(b.op("Mul", [scale, scale], "square"))  # the constant has another reader
    return b.build()


@pytest.mark.parametrize("with_bn", [True, False], ids=["bn", "conv"])
@pytest.mark.parametrize("const_shape", [(8, 1, 1), (1, 8, 1, 1), (1,)])
def test_folded_exactly(with_bn, const_shape):
    model = caffe2_block(with_bn, const_shape)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_channel_affine(folded) == 2
    assert not any(n.op_type in ("Mul", "Add") for n in folded.graph.node)
    onnx.checker.check_model(folded, full_check=True)
    assert max_diff(model, folded) < 1e-5


def test_shared_constant_is_copied_not_changed():
    model = caffe2_block(True, extra_reader=True)
    before = {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    fold_channel_affine(model)
    after = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("mul_const", "add_const", "bn.scale", "bn.beta"):
        np.testing.assert_array_equal(after[name], before[name])


def test_rank3_tensor_is_left_alone():
    # [C, 1, 1] against an [N, C, L] tensor broadcasts to another shape: not per channel.
    model = caffe2_block(False, (8, 1), rank=3)
    assert fold_channel_affine(model) == 0


def test_compensation_crosses_the_folded_affine():
    _, report = api.compress(caffe2_block(True), prune=0.25, method="udfc+", target="fake")
    comps = compensations(report)
    assert comps and all(c["compensated"] for c in comps.values())
