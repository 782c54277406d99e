"""float16 models: a float32 working copy for the graphs the tool builds on top of a model.

Graphs appended to a user's model (the model-inversion gradient, for one) are written with
float32 constants; a float16 model would mix the two types, which ONNX Runtime refuses. Running
them on a float32 copy costs nothing in fidelity: its float16 weights are exact in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.io import tensor_array

FLOAT16, FLOAT = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def float32_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it has no float16 input, else a copy computing in float32 where
    it computed in float16: initializers, declared types (inputs, outputs, value_info), Cast
    targets and tensor attributes (Constant, ConstantOfShape) of the main graph."""
    graph = model.graph
    if all(i.type.tensor_type.elem_type != FLOAT16 for i in graph.input):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for tensor in graph.initializer:
        if tensor.data_type == FLOAT16:
            tensor.CopyFrom(_widened(tensor))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == FLOAT16:
            info.type.tensor_type.elem_type = FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT16:
                attr.i = FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT16:
                attr.t.CopyFrom(_widened(attr.t))
    return out


def _widened(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(tensor_array(tensor).astype(np.float32), tensor.name)
