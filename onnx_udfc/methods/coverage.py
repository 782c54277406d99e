"""Which weight layers the quantize loop takes, and why every other one stays in float.

``--bits`` promises every weight layer on the grid; a layer it cannot take (a weight layout the
grids do not know, a weight fed at run time, a layer inside an If/Loop/Scan body) or that the
user excluded is named with its reason in the report's ``float_layers`` and the summary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import onnx

from onnx_udfc.channels.stats import LayerWeights, weight_layer
from onnx_udfc.ops.base import attr
from onnx_udfc.ops.registry import op_spec


def quantizable(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                inputs: set[str], patterns: list[re.Pattern[str]]
                ) -> tuple[LayerWeights | None, str | None]:
    """``(layer, None)`` for a weight layer to quantize, ``(None, reason)`` for one kept in
    float, ``(None, None)`` for a node without a constant weight (``inputs``: the graph's real
    inputs)."""
    spec = op_spec(node.op_type).layer
    if spec is None or len(node.input) < 2:
        return None, None
    weight, other = node.input[1], node.input[0]
    if weight in inputs:
        return None, "weight is a graph input"
    if weight not in inits:
        if node.op_type == "MatMul" and other in inits:
            return None, "MatMul with the constant weight as first operand: layout not supported"
        return None, None  # a computed operand (attention scores, a dequantized weight)
    pattern = next((p for p in patterns if p.search(node.name or "")), None)
    if pattern is not None:
        return None, f"excluded by the pattern '{pattern.pattern}' (--exclude / --quant-exclude)"
    layer = weight_layer(node, inits)
    return (layer, None) if layer is not None else (None, _layout_reason(node, inits[weight]))


# Recurrent layers: their input (W) and recurrence (R) weights, [directions, gates x hidden,
# fan-in], quantized per gate row by rounding alone (no moments reach inside the recurrence).
RECURRENT_WEIGHTS = {"LSTM": ("W", "R"), "GRU": ("W", "R"), "RNN": ("W", "R")}


def recurrent_weights(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                      inputs: set[str], patterns: list[re.Pattern[str]]
                      ) -> list[tuple[str, LayerWeights | None, str | None]]:
    """``(key, layer, reason)`` for each constant weight of a recurrent node: the layer to
    round (``key`` is ``node:W`` or ``node:R``), or None and why it stays in float."""
    roles = RECURRENT_WEIGHTS.get(node.op_type)
    if roles is None:
        return []
    name = node.name or node.output[0]
    pattern = next((p for p in patterns if p.search(node.name or "")), None)
    out = []
    for i, role in enumerate(roles, start=1):
        weight = node.input[i] if len(node.input) > i else ""
        key = f"{name}:{role}"
        if weight in inputs:
            out.append((key, None, "weight is a graph input"))
        elif weight not in inits or len(inits[weight].dims) != 3:
            continue
        elif pattern is not None:
            out.append((key, None, f"excluded by the pattern '{pattern.pattern}' (--exclude / "
                                   "--quant-exclude)"))
        else:
            out.append((key, LayerWeights(node, weight, 1, 2), None))
    return out


def _layout_reason(node: onnx.NodeProto, weight: onnx.TensorProto) -> str:
    """Why :meth:`~onnx_udfc.ops.base.WeightLayer.layout` refused the node's weight."""
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        what = "Gemm with transA=1"
    elif node.op_type == "MatMul":
        what = f"MatMul with a {len(weight.dims)}-D constant weight"
    else:
        what = f"{node.op_type} with group={attr(node, 'group', 1)}"
    return f"{what}: layout not supported"


def subgraph_weight_layers(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Every layer with a constant weight inside an If, Loop or Scan body: kept in float,
    with where it is."""
    nested = list(_nested(model.graph))
    constants = {t.name for t in model.graph.initializer}
    for _owner, _where, sub in nested:
        constants.update(t.name for t in sub.initializer)
        constants.update(o for n in sub.node if n.op_type == "Constant" for o in n.output)
    return [{"node": n.name or n.output[0],
             "reason": f"inside the {where} of the {owner.op_type} "
                       f"'{owner.name or owner.output[0]}': subgraphs are not quantized"}
            for owner, where, sub in nested for n in sub.node
            if op_spec(n.op_type).layer is not None and constants.intersection(n.input[:2])]


def _nested(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """(owning node, attribute name, subgraph) for every subgraph, at any depth."""
    for owner in graph.node:
        for a in owner.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield owner, a.name, sub
                yield from _nested(sub)
