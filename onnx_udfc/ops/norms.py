"""Normalisation ops: per-channel BatchNorm / InstanceNorm and the ops that mix values along
some axes (LayerNorm, Softmax, ...). Channel rules, traits, BatchNorm's moments and reverse
pass."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.core.io import tensor_array
from onnx_udfc.ops.base import Rule, attr, attrs, norm_axis
from onnx_udfc.ops.registry import Trait, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments


class PerChannelNorm(Rule):
    """Per-channel parameters on axis 1 (scale, bias, and for BN the running statistics)."""

    def analyse(self, node, ctx):
        if any(o for o in node.output[1:]):
            return f"{node.op_type} in training mode"
        if any(ctx.const(n) is None for n in node.input[1:] if n):
            return f"{node.op_type} with computed parameters"
        ctx.set(node.output[0], 1, ctx.slots(node.input[0], 1))
        return None

    def rewrite(self, node, rw):
        keep = rw.keep(node.input[0])
        if keep is not None:
            for i in range(1, len(node.input)):
                if node.input[i]:
                    rw.set_const(node, i, rw.const(node.input[i])[keep])


class AxisMixing(Rule):
    """Ops that mix values along some axes: channels pass only if they sit elsewhere."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        if rank is None:
            return f"{node.op_type} on a tensor of unknown rank"
        if node.op_type == "MeanVarianceNormalization":
            mixed = set(attr(node, "axes", [0, 2, 3]))
        elif node.op_type == "LayerNormalization":
            mixed = set(range(norm_axis(attr(node, "axis", -1), rank), rank))
        elif node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ctx.opset < 13:
            mixed = set(range(norm_axis(attr(node, "axis", 1), rank), rank))
        else:
            mixed = {norm_axis(attr(node, "axis", -1), rank)}
        mixed = {norm_axis(a, rank) for a in mixed}
        if info.axis is not None and info.axis in mixed:
            return f"{node.op_type} mixes values across the channel axis"
        ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        return None


def _batchnorm_moments(step: MomentStep) -> TensorMoments | None:
    """With ``anchor``, the running statistics (mean beta, variance gamma^2 on the training
    data, whatever the propagated scale) and the propagated correlation; else the affine map."""
    node, inits, x = step.node, step.inits, step.x
    if not all(n in inits for n in node.input[1:5]):
        return None
    g, beta, mu, var = (tensor_array(inits[n]).astype(np.float64) for n in node.input[1:5])
    a = g / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    if not step.anchor:
        scale = a * a if x.diagonal else np.outer(a, a)
        return TensorMoments(a * (x.mean - mu) + beta, x.cov * scale, x.hw)
    if x.diagonal:
        return TensorMoments(beta.copy(), g * g, x.hw)
    sd = np.sqrt(np.clip(np.diag(x.cov), 0.0, None))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    corr = x.cov * np.outer(inv, inv)
    np.fill_diagonal(corr, 1.0)
    return TensorMoments(beta.copy(), corr * np.outer(g, g), x.hw)


def _batchnorm_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                    ) -> dict[str, str] | None:
    """The inference form is a per-channel scale."""
    ins, x = node.input, node.input[0]
    if not all(n in inits for n in ins[1:5]):
        return None
    gamma = numpy_helper.to_array(inits[ins[1]]).astype(np.float64)
    var = numpy_helper.to_array(inits[ins[4]]).astype(np.float64)
    scale = gamma / np.sqrt(var + attrs(node).get("epsilon", 1e-5))
    rank = len(shapes.get(x, [0, 0, 0, 0]))
    s = b.const(scale.reshape([1, -1] + [1] * (rank - 2)).astype(np.float32), "bnscale")
    return {x: b.op("Mul", [dy, s])}


define("BatchNormalization", rule=PerChannelNorm(), traits=Trait.LAYER_TAIL,
       propagate=_batchnorm_moments, backward=_batchnorm_grad)
define("InstanceNormalization", rule=PerChannelNorm())
define("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization",
       "MeanVarianceNormalization", rule=AxisMixing())
