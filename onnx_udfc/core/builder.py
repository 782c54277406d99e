"""Appending nodes and constants with fresh names to a graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    """Appends nodes and constants with fresh names to a graph."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph, self.opset, self.count = graph, opset, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"udfc_inv{self.count}_{hint}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        n = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(value, n))
        return n

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: object) -> str:
        out = self.name(hint or op_type.lower())
        self.graph.node.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        if self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13):
            return self.op(op_type, [x, self.const(np.asarray(axes, np.int64), "axes")],
                           keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)
