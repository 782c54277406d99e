"""The channel-rule registry: one entry per op type, shared by analysis and rewrite.

A rule's ``analyse(node, ctx)`` tells the :class:`~onnx_udfc.channels.analysis.ChannelAnalysis`
where the node's output channels come from, or returns a reason string when it cannot follow
them (the channels touching the node are then fixed and reported). ``rewrite(node, rw)``
applies the kept channel indices (see :class:`~onnx_udfc.channels.rewrite.Rewriter`) to the
node's constants and attributes.
Adding support for an op is adding one entry here (layers with weights live in
:mod:`onnx_udfc.ops.layers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from onnx_udfc.channels.analysis import ChannelAnalysis
    from onnx_udfc.channels.rewrite import Rewriter

RULES: dict[str, Rule] = {}
# where a channel slot's values come from: a filter of a weight layer, or a zero pad
SOURCE_FILTER, SOURCE_ZERO = 1, 2


class Rule:
    """Base rule. Subclasses override ``analyse`` and, when they own constants, ``rewrite``."""

    def analyse(self, node: onnx.NodeProto, ctx: ChannelAnalysis) -> str | None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: Rewriter) -> None:
        return None


def register(*op_types: str) -> Callable[[type[Rule]], type[Rule]]:
    def wrap(cls: type[Rule]) -> type[Rule]:
        for op in op_types:
            RULES[op] = cls()
        return cls
    return wrap


def unsupported(node: onnx.NodeProto, ctx: ChannelAnalysis, reason: str) -> None:
    """Fix every channel the node reads and make its outputs opaque."""
    where = f"{reason} at '{node.name or node.output[0]}'"
    ctx.unsupported.append((node.name or node.output[0], reason))
    ctx.untouchable.add(node.output[0])
    for name in node.input:
        ctx.fix_tensor(name, where)
    for name in node.output:
        if name:
            ctx.set(name, None, None, where)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def input_or_attr(node: onnx.NodeProto, ctx_or_rw, index: int, name: str):
    """An operand given as a constant input (newer opsets) or as an attribute (older ones).

    Returns (values or None, found). ``found`` is False when the input is computed at run time.
    """
    if len(node.input) > index and node.input[index]:
        value = ctx_or_rw.const(node.input[index])
        return (None, False) if value is None else (np.asarray(value).reshape(-1).tolist(), True)
    value = attr(node, name)
    return (None if value is None else list(value)), True


def _only_constant_extras(node: onnx.NodeProto, ctx: ChannelAnalysis) -> bool:
    return all(ctx.channels(n) is None for n in node.input[1:] if n)


# -- pass-through ---------------------------------------------------------------------------
ELEMENTWISE_UNARY = (
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Softplus", "Softsign", "Gelu", "Erf", "Dropout", "Identity", "Cast", "Abs", "Neg", "Exp",
    "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Mish", "Celu",
    "ThresholdedRelu", "IsNaN", "IsInf", "Not", "CastLike",
)
SPATIAL = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
           "GlobalLpPool", "MaxRoiPool")


@register(*ELEMENTWISE_UNARY)
class PassThrough(Rule):
    """Output channel c is input channel c."""

    spatial = False

    def analyse(self, node, ctx):
        if not _only_constant_extras(node, ctx):
            return f"{node.op_type} with a computed parameter input"
        info = ctx.channels(node.input[0])
        if info is None:
            return f"{node.op_type} input has no channel information"
        if self.spatial and info.axis not in (None, 1):
            return f"{node.op_type} works on the axis that holds the channels"
        ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        for extra in node.output[1:]:
            if extra:
                ctx.set(extra, None, None, f"secondary output of {node.op_type}")
        return None


@register("CastLike")
class CastLike(Rule):
    """Output channels are input 0's; input 1 only lends its element type, so a constant cast
    like an activation (``CastLike(0.0, x)``, dynamo's zero bias) stays a constant."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        if info is not None:
            ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        return None


@register(*SPATIAL)
class SpatialPassThrough(PassThrough):
    """Pooling: channels pass through as long as they sit on axis 1."""

    spatial = True


# -- elementwise couplers and per-channel constants ------------------------------------------
@register("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu", "Where",
          "BitShift", "And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual",
          "GreaterOrEqual", "Mod")
class Elementwise(Rule):
    """Broadcasting elementwise ops: activations tie their channels index by index (residual
    connections); a constant with a full channel dimension is a per-channel follower."""

    def analyse(self, node, ctx):
        out_rank = ctx.rank(node.output[0])
        acts = [n for n in node.input if ctx.channels(n) is not None]
        if out_rank is None:
            out_rank = max(ctx.rank(n) or 0 for n in node.input if n)
        aligned = {ctx.channels(n).axis + out_rank - (ctx.rank(n) or out_rank)
                   for n in acts if ctx.channels(n).axis is not None}
        if not aligned:
            info = ctx.channels(acts[0])
            if len(acts) > 1:
                for n in acts:  # several opaque inputs: nothing to tie, all stay fixed
                    ctx.fix_tensor(n, info.opaque_reason)
            ctx.set(node.output[0], None, None, info.opaque_reason)
            return None
        if len(aligned) > 1:
            return "inputs hold their channels on different axes"
        axis = aligned.pop()
        out_shape = ctx.shape(node.output[0])
        out_size = out_shape[axis] if out_shape is not None else None
        slots = None
        for n in acts:
            rank = ctx.rank(n) or out_rank
            ax = axis - (out_rank - rank)
            shape = ctx.shape(n)
            if ax < 0 or (shape is not None and shape[ax] == 1 and out_size != 1):
                continue  # broadcast along the channel axis: not tied
            s = ctx.slots(n, ax)
            if slots is None:
                slots = s
            elif len(s) == len(slots):
                ctx.union(slots, s)
            else:
                return "inputs disagree on the channel count"
        if slots is None:  # every activation broadcasts: the channels come from a constant
            if not isinstance(out_size, int):
                return "cannot tell the output's channel count"
            slots = ctx.new_slots(out_size)
            ctx.fix(slots, "channels created by broadcasting a constant")
        for n in node.input:
            value = ctx.const(n)
            if value is not None and value.ndim > 0:
                ax = axis - (out_rank - value.ndim)
                if ax >= 0 and value.shape[ax] not in (1, len(slots)):
                    return f"constant '{n}' does not broadcast per channel"
            elif value is None and n and ctx.channels(n) is None and len(slots) > 1:
                # Computed from constants but not folded (too large, DequantizeLinear, ...):
                # the rewrite could not cut it, so it must broadcast along the channels.
                shape = ctx.shape(n)
                ax = axis - (out_rank - len(shape)) if shape is not None else 0
                if shape is None or (ax >= 0 and shape[ax] != 1):
                    return f"per-channel operand '{n}' is computed at run time"
        ctx.set(node.output[0], axis, slots)
        return None

    def rewrite(self, node, rw):
        out = node.output[0]
        keep = rw.keep(out)
        if keep is None:
            return
        axis, out_rank = rw.axis(out), rw.rank(out)
        for i, n in enumerate(node.input):
            value = rw.const(n)
            if value is None or value.ndim == 0:
                continue
            ax = axis - (out_rank - value.ndim)
            if ax >= 0 and value.shape[ax] == rw.size(out) and rw.size(out) > 1:
                rw.set_const(node, i, np.take(value, keep, axis=ax))


# -- normalisation layers ---------------------------------------------------------------------
@register("BatchNormalization", "InstanceNormalization")
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


@register("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax", "LpNormalization",
          "MeanVarianceNormalization")
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
