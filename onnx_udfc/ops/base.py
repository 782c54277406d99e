"""Channel rules and the helpers every op family shares.

A rule's ``analyse(node, ctx)`` tells the :class:`~onnx_udfc.channels.analysis.ChannelAnalysis`
where the node's output channels come from, or returns a reason string when it cannot follow
them (the channels touching the node are then fixed and reported). ``rewrite(node, rw)``
applies the kept channel indices (see :class:`~onnx_udfc.channels.rewrite.Rewriter`) to the
node's constants and attributes. A :class:`WeightLayer` rule also tells where its weight keeps
the channels (compensation, statistics and cost read that). Rules are registered with their op
types by :func:`onnx_udfc.ops.registry.define`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from onnx_udfc.channels.analysis import ChannelAnalysis
    from onnx_udfc.channels.rewrite import Rewriter
    from onnx_udfc.core.io import Shape

# where a channel slot's values come from: a filter of a weight layer, or a zero pad
SOURCE_FILTER, SOURCE_ZERO = 1, 2


class Rule:
    """Base rule. Subclasses override ``analyse`` and, when they own constants, ``rewrite``."""

    def analyse(self, node: onnx.NodeProto, ctx: ChannelAnalysis) -> str | None:
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: Rewriter) -> None:
        return None


class WeightLayer(Rule):
    """A layer with a constant weight (input 1): the producer of fresh output channels (one
    filter each) and the consumer whose weight slice absorbs a pruned input channel."""

    bias_input: int | None = None  # the input holding the per-output-channel bias
    assume_folded = False  # without statistics, the weight is taken as BN-folded (Conv)

    def layout(self, node: onnx.NodeProto,
               inits: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
        """(output axis, input axis) of the weight, or None when it is not a plain
        filters-by-inputs weight (transposed input, grouped layout, 3-D weight, ...)."""
        raise NotImplementedError

    def channels(self, node: onnx.NodeProto, dims: list[int]) -> tuple[int, int]:
        """(input channels, output channels) of a weight with ``dims``."""
        raise NotImplementedError

    def channel_axis_from_right(self, weight_rank: int) -> int:
        """Where the output channels sit in the layer's output, counted from the right."""
        raise NotImplementedError

    def cost(self, node: onnx.NodeProto, dims: list[int],
             shapes: dict[str, Shape]) -> tuple[int, int, int] | None:
        """(input channels, output channels, multiply-adds per sample) for weight ``dims``."""
        raise NotImplementedError

    def slice_weight(self, node: onnx.NodeProto, weight: np.ndarray,
                     keep_in: np.ndarray | None, keep_out: np.ndarray | None) -> np.ndarray:
        """The weight restricted to the kept input and output channels."""
        raise NotImplementedError

    def rewrite(self, node: onnx.NodeProto, rw: Rewriter) -> None:
        keep_in, keep_out = rw.keep(node.input[0]), rw.keep(node.output[0])
        if keep_in is None and keep_out is None:
            return
        rw.set_const(node, 1, self.slice_weight(node, rw.const(node.input[1]), keep_in,
                                                keep_out))
        index = self.bias_input
        if keep_out is None or index is None or len(node.input) <= index \
                or not node.input[index]:
            return
        bias = rw.const(node.input[index])
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == rw.size(node.output[0]) \
                and bias.shape[-1] > 1:
            rw.set_const(node, index, np.take(bias, keep_out, axis=-1))


class IntegerLayer(Rule):
    """An op that computes a weight layer's product on integer codes (QLinearConv,
    ConvInteger, MatMulInteger, ...): the model is already quantized there. Its cost is the
    float ``layer``'s, on the integer weight at ``weight_input``."""

    def __init__(self, layer: WeightLayer, weight_input: int,
                 bias_input: int | None = None) -> None:
        self.layer, self.weight_input, self.bias_input = layer, weight_input, bias_input

    def analyse(self, node: onnx.NodeProto, ctx: ChannelAnalysis) -> str | None:
        return f"{node.op_type} computes on integer weights (already quantized)"


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


class UnknownRank(ValueError):
    """A rule needs the rank of a tensor that shape inference could not give."""


def norm_axis(axis: int, rank: int | None) -> int:
    if rank is None and axis < 0:
        raise UnknownRank("the rank of its input is unknown (fix it with --input-shape)")
    return axis + rank if axis < 0 else axis  # type: ignore[operator]


def input_or_attr(node: onnx.NodeProto, ctx_or_rw, index: int, name: str):
    """An operand given as a constant input (newer opsets) or as an attribute (older ones).

    Returns (values or None, found). ``found`` is False when the input is computed at run time.
    """
    if len(node.input) > index and node.input[index]:
        value = ctx_or_rw.const(node.input[index])
        return (None, False) if value is None else (np.asarray(value).reshape(-1).tolist(), True)
    value = attr(node, name)
    return (None if value is None else list(value)), True


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node`` by name."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
