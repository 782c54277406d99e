"""Whole-model checks against the registry, run once before the channel analysis: weight
layers whose constants contradict their op, and models that are already quantized. Both
pass ``onnx.checker`` and would otherwise be analysed into wrong channels and costs."""

from __future__ import annotations

import onnx

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import Shape
from onnx_udfc.ops.registry import op_spec


def check_weight_layers(model: onnx.ModelProto, shapes: dict[str, Shape]) -> None:
    """Raise ``UdfcError("<node>: <why>")`` for the first weight layer whose weight or bias
    contradicts its op or its input's shape (rank, channels, group, kernel, bias length)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        layer = op_spec(node.op_type).layer
        reason = layer.check(node, inits, shapes) if layer is not None else None
        if reason is not None:
            raise UdfcError(f"{node.name or node.output[0]}: {reason}")


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """The layers that already compute on integer codes: integer ops (QLinearConv,
    ConvInteger, MatMulInteger, ...) and weight layers whose weight a DequantizeLinear gives."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = []
    for node in model.graph.node:
        spec = op_spec(node.op_type)
        if spec.integer is not None or (spec.layer is not None and len(node.input) > 1
                                        and node.input[1] in dequantized):
            found.append(node.name or node.output[0])
    return found


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Compression starts from float weights: refuse a model that is already quantized."""
    layers = quantized_layers(model)
    if layers:
        raise UdfcError(f"the model is already quantized ({len(layers)} layer(s) compute on "
                        f"integer weights, e.g. '{layers[0]}'); pass the float model it was "
                        "made from")
