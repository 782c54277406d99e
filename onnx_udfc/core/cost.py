"""Parameters and multiply-accumulates per layer, for one sample.

MACs count the layers with weights (Conv, ConvTranspose, Gemm, MatMul), which dominate every
CNN and MLP; FLOPs are reported as 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import onnx

from onnx_udfc.core.io import Shape

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


def _numel(dims) -> int:
    return int(math.prod(int(d) for d in dims)) if len(dims) else 1


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point initializer (weights, biases, BN statistics)."""
    return sum(_numel(t.dims) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)


def _spatial(shape: Shape | None) -> int:
    if shape is None or len(shape) <= 2:
        return 1
    dims = [d if isinstance(d, int) else 1 for d in shape[2:]]
    return math.prod(dims)


def layer_stats(model: onnx.ModelProto, shapes: dict[str, Shape]) -> list[LayerStats]:
    """Per weight layer: channels, parameters and MACs (spatial sizes from ``shapes``)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = [int(d) for d in inits[node.input[1]].dims]
        bias = _numel(inits[node.input[2]].dims) if len(node.input) > 2 and \
            node.input[2] in inits else 0
        params = _numel(w) + bias
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":
            cin, cout = w[1] * group, w[0]
            macs = _numel(w) * _spatial(shapes.get(node.output[0]))
        elif node.op_type == "ConvTranspose":
            cin, cout = w[0], w[1] * group
            macs = _numel(w) * _spatial(shapes.get(node.input[0]))
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            cout, cin = (w[0], w[1]) if trans_b else (w[1], w[0])
            macs = _numel(w)
        else:
            if len(w) != 2:
                continue
            cin, cout = w
            shape = shapes.get(node.input[0])
            rows = math.prod(d if isinstance(d, int) else 1 for d in shape[1:-1]) \
                if shape is not None and len(shape) > 2 else 1
            macs = _numel(w) * rows
        layers.append(LayerStats(node.name or node.output[0], node.op_type, cin, cout, params,
                                 macs))
    return layers


def total_macs(layers: list[LayerStats]) -> int:
    return sum(layer.macs for layer in layers)
