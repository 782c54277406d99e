"""The layers that own weights: Conv, ConvTranspose, Gemm, MatMul. Channel rules, weight
layouts, cost, moments and reverse passes.

These are the *producers* (their output channels are fresh slots, one filter each) and the
*consumers* (removing an input channel drops a slice of their weight, which is what absorbs a
pruned channel).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import IntegerLayer, WeightLayer, attr, attrs, set_attr
from onnx_udfc.ops.cost import numel, spatial_size
from onnx_udfc.ops.registry import define
from onnx_udfc.ops.tensor_moments import (
    MomentStep,
    TensorMoments,
    conv_moments,
    linear_moments,
)


def fix_computed_bias(node, ctx, index: int, out: np.ndarray) -> None:
    """A bias computed at run time (the dynamo exporter's ``Expand(CastLike(0, x), [N])``
    when nothing folded it) cannot be cut: the output channels it covers stay."""
    name = node.input[index] if len(node.input) > index else ""
    if not name or ctx.const(name) is not None:
        return
    shape = ctx.shape(name)
    if shape is not None and len(shape) and shape[-1] == 1:
        return  # broadcast along the channels
    ctx.fix(out, f"{node.op_type} bias '{name}' is computed at run time")


def _weight_dims(node: onnx.NodeProto, inits: dict) -> list[int] | None:
    """The constant weight's dims (input 1), or None for a computed weight."""
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    return None if w is None else [int(d) for d in w.dims]


def _bias_dims(node: onnx.NodeProto, inits: dict) -> tuple[str, list[int]] | None:
    """The constant bias (input 2) and its dims, or None."""
    b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return None if b is None else (b.name, [int(d) for d in b.dims])


def _static(shape, axis: int) -> int | None:
    """A static dim of ``shape`` (None when unknown or symbolic)."""
    return shape[axis] if shape is not None and isinstance(shape[axis], int) else None


class _ConvFamily(WeightLayer):
    """Conv and ConvTranspose. The weight's axis 1 holds one group's channels, axis 0 all of
    the other side's; the subclasses differ only in which of the two indexes the outputs (the
    filter axis, :attr:`out_axis`). Plain (producer + consumer), depthwise (input channel c
    feeds output channels c*m..c*m+m-1, so they are one class) or grouped (the same number of
    channels must go from every group, on both sides; only where the groups split the weight's
    input axis)."""

    out_axis: int
    bias_input = 2
    assume_folded = True

    @property
    def in_axis(self) -> int:
        return 1 - self.out_axis

    def channels(self, node, dims):
        whole = [int(dims[0]), int(dims[1]) * int(attr(node, "group", 1))]
        return whole[self.in_axis], whole[self.out_axis]

    def _filters(self, w: np.ndarray, cout: int) -> np.ndarray:
        """The weight as [output channels, rest]."""
        return np.moveaxis(w, self.out_axis, 0).reshape(cout, -1)

    def analyse(self, node, ctx):
        w = ctx.const(node.input[1])
        if w is None:
            return f"{node.op_type} with a computed weight"
        groups = int(attr(node, "group", 1))
        cin, cout = self.channels(node, w.shape)
        xs = ctx.slots(node.input[0], 1)
        if len(xs) != cin:
            return f"{node.op_type} expects {cin} input channels, the graph gives {len(xs)}"
        if groups == 1:
            ctx.produce(node, node.output[0], 1, self._filters(w, cout))
        elif groups == cin:
            ctx.set(node.output[0], 1, np.repeat(xs, cout // cin))
        elif self.out_axis == 0:
            ctx.balance.append((xs, groups))
            out = ctx.produce(node, node.output[0], 1, self._filters(w, cout))
            ctx.balance.append((out, groups))
        else:
            return f"grouped {node.op_type} (group={groups})"
        fix_computed_bias(node, ctx, 2, ctx.tensors[node.output[0]].slots)
        return None

    def slice_weight(self, node, w, keep_in, keep_out):
        groups = int(attr(node, "group", 1))
        cin, _ = self.channels(node, w.shape)
        whole, split = (keep_out, keep_in) if self.out_axis == 0 else (keep_in, keep_out)
        if whole is not None:
            w = w[whole]
        if groups == 1:
            if split is not None:
                w = w[:, split]
        elif groups == cin:
            if keep_in is not None:
                set_attr(node, "group", len(keep_in))
        elif keep_in is not None:  # grouped on the input axis (analyse refuses the others)
            per_in = cin // groups
            per_out = w.shape[0] // groups
            parts = []
            for g in range(groups):
                rel = keep_in[(keep_in >= g * per_in) & (keep_in < (g + 1) * per_in)] - g * per_in
                parts.append(w[g * per_out:(g + 1) * per_out][:, rel])
            w = np.concatenate(parts, axis=0)
        return w

    def check(self, node, inits, shapes):
        dims = _weight_dims(node, inits)
        if dims is None:
            return None
        op, x = node.op_type, node.input[0]
        shape, groups = shapes.get(x), int(attr(node, "group", 1))
        if len(dims) < 3:
            return f"{op} weight {dims} has rank {len(dims)}; it needs [filters, channels, " \
                   "kernel...]"
        if shape is not None and len(shape) != len(dims):
            return f"{op} weight {dims} has rank {len(dims)} but its input '{x}' has rank " \
                   f"{len(shape)}"
        kernel = attr(node, "kernel_shape")
        if kernel is not None and list(kernel) != dims[2:]:
            return f"{op} kernel_shape {list(kernel)} does not match its weight {dims}"
        if groups < 1 or dims[0] % groups:
            return f"{op} group {groups} does not divide the weight's {dims[0]} " \
                   + ("filters" if self.out_axis == 0 else "input channels")
        cin, cout = self.channels(node, dims)
        if _static(shape, 1) not in (None, cin):
            return f"{op} weight {dims} (group {groups}) reads {cin} input channels, its " \
                   f"input '{x}' has {shape[1]}"
        bias = _bias_dims(node, inits)
        if bias is not None and bias[1] != [cout]:
            return f"{op} bias '{bias[0]}' has shape {bias[1]}; it needs [{cout}], one per " \
                   "output channel"
        return None

    def layout(self, node, inits):
        # Grouped, axis 1 holds one group's channels: as the filter axis it misses the others.
        if self.out_axis == 1 and int(attr(node, "group", 1)) != 1:
            return None
        return self.out_axis, self.in_axis

    def channel_axis_from_right(self, weight_rank):
        return weight_rank - 1  # axis 1 of [N, C, spatial...]

    def cost(self, node, dims, shapes):
        cin, cout = self.channels(node, dims)
        # Each position of the tensor on the weight's axis 0 meets every weight once.
        side = node.output[0] if self.out_axis == 0 else node.input[0]
        return cin, cout, numel(dims) * spatial_size(shapes.get(side))


class Conv(_ConvFamily):
    """Conv: weight [Cout, Cin/group, k...]."""

    out_axis = 0


class ConvTranspose(_ConvFamily):
    """ConvTranspose: weight [Cin, Cout/group, k...]."""

    out_axis = 1


class Gemm(WeightLayer):
    """Gemm with a constant B: consumes A's features (axis 1, or 0 with transA) and produces N
    output features; bias C follows the output features."""

    bias_input = 2

    @staticmethod
    def _axes(node) -> tuple[int, int]:
        """(output axis, input axis) of B."""
        return (0, 1) if int(attr(node, "transB", 0)) else (1, 0)

    def check(self, node, inits, shapes):
        dims = _weight_dims(node, inits)
        if dims is None:
            return None
        x = node.input[0]
        if len(dims) != 2:
            return f"Gemm weight {dims} has rank {len(dims)}; it needs rank 2"
        shape = shapes.get(x)
        if shape is not None and len(shape) != 2:
            return f"Gemm input '{x}' has rank {len(shape)}; it needs rank 2"
        k, n = self.channels(node, dims)
        given = _static(shape, 0 if int(attr(node, "transA", 0)) else 1)
        if given not in (None, k):
            return f"Gemm weight {dims} takes {k} input features, its input '{x}' has {given}"
        bias = _bias_dims(node, inits)
        if bias is not None and (len(bias[1]) > 2 or bias[1] and bias[1][-1] not in (1, n)):
            return f"Gemm bias '{bias[0]}' has shape {bias[1]}; it does not broadcast to the " \
                   f"{n} outputs"
        return None

    def layout(self, node, inits):
        return None if int(attr(node, "transA", 0)) else self._axes(node)

    def channel_axis_from_right(self, weight_rank):
        return 1

    def channels(self, node, dims):
        out_axis, in_axis = self._axes(node)
        return dims[in_axis], dims[out_axis]

    def cost(self, node, dims, shapes):
        return *self.channels(node, dims), numel(dims)

    def analyse(self, node, ctx):
        b = ctx.const(node.input[1])
        if b is None:
            return "Gemm with a computed B"
        trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        k = b.shape[1] if trans_b else b.shape[0]
        xs = ctx.slots(node.input[0], 0 if trans_a else 1)
        if len(xs) != k:
            return f"Gemm expects {k} input features, the graph gives {len(xs)}"
        out = ctx.produce(node, node.output[0], 1, b if trans_b else b.T)
        fix_computed_bias(node, ctx, 2, out)
        return None

    def slice_weight(self, node, b, keep_in, keep_out):
        out_axis, in_axis = self._axes(node)
        if keep_in is not None:
            b = np.take(b, keep_in, axis=in_axis)
        if keep_out is not None:
            b = np.take(b, keep_out, axis=out_axis)
        return b


class MatMul(WeightLayer):
    """MatMul by a constant 2-D weight on the right: the Linear of 3-D inputs."""

    def check(self, node, inits, shapes):
        # Only the 2-D weight of a Linear: other constant ranks are batched products.
        dims = _weight_dims(node, inits)
        shape = shapes.get(node.input[0])
        if dims is None or len(dims) != 2 or shape is None or len(shape) < 2:
            return None
        given = _static(shape, -1)
        if given not in (None, dims[0]):
            return f"MatMul weight {dims} takes {dims[0]} input features, its input " \
                   f"'{node.input[0]}' has {given}"
        return None

    def layout(self, node, inits):
        return (1, 0) if len(inits[node.input[1]].dims) == 2 else None

    def channel_axis_from_right(self, weight_rank):
        return 1

    def channels(self, node, dims):
        return dims[0], dims[1]

    def cost(self, node, dims, shapes):
        if len(dims) != 2:
            return None
        shape = shapes.get(node.input[0])
        rows = math.prod(d if isinstance(d, int) else 1 for d in shape[1:-1]) \
            if shape is not None and len(shape) > 2 else 1
        return *self.channels(node, dims), numel(dims) * rows

    def analyse(self, node, ctx):
        b = ctx.const(node.input[1])
        if b is None and ctx.const(node.input[0]) is not None:
            return "MatMul with the constant weight as first operand"
        if b is None or ctx.channels(node.input[1]) is not None:
            return "MatMul between two computed tensors"
        if b.ndim != 2:
            return f"MatMul with a {b.ndim}-D constant weight"
        rank = ctx.rank(node.input[0])
        if rank is None or rank < 2:
            return "MatMul input of unknown or vector rank"
        xs = ctx.slots(node.input[0], rank - 1)
        if len(xs) != b.shape[0]:
            return f"MatMul expects {b.shape[0]} input features, the graph gives {len(xs)}"
        ctx.produce(node, node.output[0], rank - 1, b.T)
        return None

    def slice_weight(self, node, b, keep_in, keep_out):
        if keep_in is not None:
            b = b[keep_in]
        if keep_out is not None:
            b = b[:, keep_out]
        return b


# -- moments ----------------------------------------------------------------------------------
def _conv_moments(step: MomentStep) -> TensorMoments | None:
    node = step.node
    if node.input[1] not in step.inits:
        return None
    return conv_moments(step.const(node.input[1]), step.optional_const(2), step.x,
                        int(attr(node, "group", 1)), step.spatial,
                        step.targets.get(node.output[0]), step.max_full, step.full)


def _dense_moments(step: MomentStep, w: np.ndarray, b: np.ndarray | None
                   ) -> TensorMoments | None:
    """``w`` as [outputs, inputs]."""
    if w.shape[1] != step.x.mean.size:
        return None
    return linear_moments(w, b, step.x, step.max_full, step.full)


def _gemm_moments(step: MomentStep) -> TensorMoments | None:
    node = step.node
    w = step.const(node.input[1])
    if w is None or w.ndim != 2 or attr(node, "transA", 0):
        return None
    if not attr(node, "transB", 0):
        w = w.T
    w = w * float(attr(node, "alpha", 1.0))
    b = step.optional_const(2)
    if b is not None:
        b = np.broadcast_to(b.reshape(-1) * float(attr(node, "beta", 1.0)), (w.shape[0],))
    return _dense_moments(step, w, b)


def _matmul_moments(step: MomentStep) -> TensorMoments | None:
    w = step.const(step.node.input[1])
    return None if w is None or w.ndim != 2 else _dense_moments(step, w.T, None)


# -- reverse passes ---------------------------------------------------------------------------
def _conv_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
               ) -> dict[str, str] | None:
    """The transposed convolution with the same weights."""
    a, ins, x = attrs(node), node.input, node.input[0]
    w = ins[1]
    if w not in inits or x not in shapes or node.output[0] not in shapes:
        return None
    k = list(numpy_helper.to_array(inits[w]).shape[2:])
    nd = len(k)
    strides = a.get("strides", [1] * nd)
    dil = a.get("dilations", [1] * nd)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    pads = a.get("pads", [0] * (2 * nd))
    xs, ys = shapes[x][2:], shapes[node.output[0]][2:]
    outpad = [xs[i] - ((ys[i] - 1) * strides[i] - pads[i] - pads[i + nd]
                       + dil[i] * (k[i] - 1) + 1) for i in range(nd)]
    if any(p < 0 or p >= max(strides[i], dil[i]) for i, p in enumerate(outpad)):
        return None
    return {x: b.op("ConvTranspose", [dy, w], kernel_shape=k, strides=strides, pads=pads,
                    dilations=dil, group=a.get("group", 1), output_padding=outpad)}


def _linear_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                 ) -> dict[str, str] | None:
    """Gemm / MatMul with a constant right-hand side: ``dA = dY B^T`` (times alpha, transposed
    back under transA)."""
    x, w, a = node.input[0], node.input[1], attrs(node)
    if w not in inits or x in inits or x not in shapes or (
            len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    weight = numpy_helper.to_array(inits[w]).astype(np.float64)
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        weight = (weight.T if a.get("transB", 0) else weight) * a.get("alpha", 1.0)
    g = b.op("MatMul", [dy, b.const(np.ascontiguousarray(weight.T).astype(np.float32), "wt")])
    if node.op_type == "Gemm" and a.get("transA", 0):
        g = b.op("Transpose", [g], perm=[1, 0])
    return {x: g}


define("Conv", rule=Conv(), propagate=_conv_moments, backward=_conv_grad)
define("ConvTranspose", rule=ConvTranspose())
define("Gemm", rule=Gemm(), propagate=_gemm_moments, backward=_linear_grad)
define("MatMul", rule=MatMul(), propagate=_matmul_moments, backward=_linear_grad)
# Integer forms of the layers (already-quantized models): weight and bias inputs per op.
define("QLinearConv", rule=IntegerLayer(Conv(), 3, 8))
define("ConvInteger", rule=IntegerLayer(Conv(), 1))
define("QLinearMatMul", rule=IntegerLayer(MatMul(), 3))
define("MatMulInteger", rule=IntegerLayer(MatMul(), 1))
define("QGemm", rule=IntegerLayer(Gemm(), 3, 6))  # com.microsoft
