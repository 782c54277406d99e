"""The reverse pass of a network's ops as ONNX nodes, for :mod:`onnx_udfc.moments.inverted`.

:func:`backward` takes a forward node and the name of the gradient at its first output and
appends the nodes computing the gradients at its inputs, by the op's ``backward`` rule in
:mod:`onnx_udfc.ops` (Conv by ConvTranspose with the same weights, BN (inference form) and
activations by their elementwise derivatives, Add/Sub/Mul by fan-out, Gemm/MatMul by the
transposed constant weight, pooling and shape ops by their transposes). An op without a rule
returns None (the caller stops the gradient there).
"""

from __future__ import annotations

import onnx

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.registry import op_spec


def backward(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
             ) -> dict[str, str] | None:
    """Gradients of ``node``'s non-constant inputs given ``dy`` at its first output, or None
    when there is no rule for it."""
    rule = op_spec(node.op_type).backward
    return None if rule is None else rule(b, node, dy, shapes, inits)
