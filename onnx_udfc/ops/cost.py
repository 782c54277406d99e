"""Parameters and multiply-accumulates per layer, for one sample.

MACs count the layers with weights (each :class:`~onnx_udfc.ops.base.WeightLayer` gives its
own), which dominate every CNN and MLP; FLOPs are reported as 2 x MACs. A layer of an
already-quantized model counts as its float twin: an integer op
(:class:`~onnx_udfc.ops.base.IntegerLayer`) or a layer whose weight a ``DequantizeLinear``
reads from integer codes; its parameters are the stored integer elements.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from onnx_udfc.core.io import Shape
from onnx_udfc.ops.base import WeightLayer
from onnx_udfc.ops.registry import op_spec

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
# Their inputs past the first are scales and zero points, not parameters.
_QUANTIZERS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class LayerStats:
    name: str
    op: str
    in_channels: int
    out_channels: int
    params: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def numel(dims) -> int:
    return int(math.prod(int(d) for d in dims)) if len(dims) else 1


@dataclass(frozen=True)
class StoredLayer:
    """A weight layer with the initializers that hold its weight and bias."""

    node: onnx.NodeProto
    layer: WeightLayer  # the float layer that gives its channels and cost
    weight: onnx.TensorProto
    bias: onnx.TensorProto | None


def stored_layers(model: onnx.ModelProto) -> list[StoredLayer]:
    """Every weight layer whose weight is an initializer, directly or through a
    ``DequantizeLinear`` of integer codes, and every integer op with a constant weight."""
    inits = {t.name: t for t in model.graph.initializer}
    stored = dict(inits)
    stored.update((n.output[0], inits[n.input[0]]) for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    found = []
    for node in model.graph.node:
        spec = op_spec(node.op_type)
        if spec.integer is not None:
            layer, at, bias_at = spec.integer.layer, spec.integer.weight_input, \
                spec.integer.bias_input
        elif spec.layer is not None:
            layer, at, bias_at = spec.layer, 1, spec.layer.bias_input
        else:
            continue
        if len(node.input) <= at or node.input[at] not in stored:
            continue
        bias = stored.get(node.input[bias_at]) \
            if bias_at is not None and len(node.input) > bias_at else None
        found.append(StoredLayer(node, layer, stored[node.input[at]], bias))
    return found


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point initializer (weights, biases, BN statistics) but the
    scales of a quantized model, and of the integer weights and biases of its layers."""
    scales = {name for n in model.graph.node if n.op_type in _QUANTIZERS or
              op_spec(n.op_type).integer is not None for name in n.input[1:]}
    floats = {t.name: numel(t.dims) for t in model.graph.initializer
              if t.data_type in _FLOAT_TYPES and t.name not in scales}
    integers = {t.name: numel(t.dims) for s in stored_layers(model)
                for t in (s.weight, s.bias) if t is not None and t.data_type not in _FLOAT_TYPES}
    return sum(floats.values()) + sum(integers.values())


def spatial_size(shape: Shape | None) -> int:
    """Positions per sample of an ``[N, C, spatial...]`` tensor (1 without spatial axes)."""
    if shape is None or len(shape) <= 2:
        return 1
    dims = [d if isinstance(d, int) else 1 for d in shape[2:]]
    return math.prod(dims)


def layer_stats(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[LayerStats]:
    """Per weight layer: channels, parameters and MACs (spatial sizes from ``shapes``)."""
    layers = []
    for s in stored_layers(model):
        w = [int(d) for d in s.weight.dims]
        sized = s.layer.cost(s.node, w, shapes)
        if sized is None:
            continue
        bias = numel(s.bias.dims) if s.bias is not None else 0
        cin, cout, macs = sized
        layers.append(LayerStats(s.node.name or s.node.output[0], s.node.op_type, cin, cout,
                                 numel(w) + bias, macs))
    return layers


def total_macs(layers: list[LayerStats]) -> int:
    return sum(layer.macs for layer in layers)
