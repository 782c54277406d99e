"""What each graph input of a network holds when it is run on samples.

Most inputs hold samples (a batch of images or vectors, drawn or read per sample). Some hold
none: a weight fed at run time, an If's condition, an index, a scalar. Those are fed whole, with
their own static shape, to every batch.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc.core.io import graph_inputs
from onnx_udfc.ops.registry import op_spec


def fixed_inputs(model: onnx.ModelProto) -> set[str]:
    """The graph inputs that hold no samples: weights fed at run time (read as a weight or
    bias by a weight layer), non-float inputs (an If's condition, an index) and scalars. They
    are fed with their own static shape, without a sample axis."""
    inputs = {i.name: i for i in graph_inputs(model)}
    fixed = {n for node in model.graph.node if op_spec(node.op_type).layer is not None
             for n in node.input[1:] if n in inputs}
    for name, inp in inputs.items():
        tt = inp.type.tensor_type
        scalar = tt.HasField("shape") and not len(tt.shape.dim)
        if scalar or not np.issubdtype(
                onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), np.floating):
            fixed.add(name)
    return fixed


def fixed_value(dims: list[int], elem_type: int, rng: np.random.Generator) -> np.ndarray:
    """A sensible stand-in for a fixed input: a float one drawn like an initial weight,
    N(0, 1/fan-in); any other (a condition, an index) zero."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    if not np.issubdtype(dtype, np.floating):
        return np.zeros(dims, dtype)
    fan_in = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    return (rng.standard_normal(dims) / np.sqrt(fan_in)).astype(dtype)


def undrawn_input_cause(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> str | None:
    """Why ``feed`` cannot run ``model``: the first input it lacks, or None."""
    missing = [i.name for i in graph_inputs(model) if i.name not in feed]
    if not missing:
        return None
    if not feed:
        return "no input has a static shape to draw samples for"
    return f"input '{missing[0]}' has no static shape apart from the batch"
