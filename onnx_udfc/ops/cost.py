"""Parameters and multiply-accumulates per layer, for one sample.

MACs count the layers with weights (each :class:`~onnx_udfc.ops.base.WeightLayer` gives its
own), which dominate every CNN and MLP; FLOPs are reported as 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from onnx_udfc.core.io import Shape
from onnx_udfc.ops.registry import op_spec

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


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


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point initializer (weights, biases, BN statistics)."""
    return sum(numel(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)


def spatial_size(shape: Shape | None) -> int:
    """Positions per sample of an ``[N, C, spatial...]`` tensor (1 without spatial axes)."""
    if shape is None or len(shape) <= 2:
        return 1
    dims = [d if isinstance(d, int) else 1 for d in shape[2:]]
    return math.prod(dims)


def layer_stats(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[LayerStats]:
    """Per weight layer: channels, parameters and MACs (spatial sizes from ``shapes``)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        layer = op_spec(node.op_type).layer
        if layer is None or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = [int(d) for d in inits[node.input[1]].dims]
        sized = layer.cost(node, w, shapes)
        if sized is None:
            continue
        bias = numel(inits[node.input[2]].dims) if len(node.input) > 2 and \
            node.input[2] in inits else 0
        cin, cout, macs = sized
        layers.append(LayerStats(node.name or node.output[0], node.op_type, cin, cout,
                                 numel(w) + bias, macs))
    return layers


def total_macs(layers: list[LayerStats]) -> int:
    return sum(layer.macs for layer in layers)
