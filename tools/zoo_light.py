"""Weight-free ("light") zoo files: weights as ``ConstantOfShape`` placeholders, re-drawn on load.

The ONNX package ships its backend test models this way (``onnx/backend/test/data/light``): each
weight is a ``ConstantOfShape`` node fed by an int64 shape initializer. The coverage zoo stores
its committed fixtures the same way (:func:`skeletonise`), which keeps them a few kB each while
the graph stays exactly what the exporter wrote; :func:`materialise` puts seeded random values
back, chosen by the role of each weight (He-normal conv/linear weights, small biases and BN
shifts, BN scales and variances and LayerNorm scales in [0.5, 1.5]).

Torch-free: used by ``tools/make_zoo.py``, ``tools/bench_zoo.py`` and ``tests/test_zoo.py``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PLACEHOLDER = 0.02  # the value the ONNX light models use
# (op, input index) pairs whose tensors are re-drawn; other float initializers are kept.
ROLE_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
            "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
            "LayerNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
            "Div": (1,), "PRelu": (1,), "Unsqueeze": (0,), "Transpose": (0,), "Reshape": (0,)}


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _readers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            out[name].append((node, i))
    return out


def _role(name: str, readers) -> tuple[str, int, onnx.NodeProto | None, str | None]:
    uses = readers.get(name, [])
    if not uses:
        return "", 0, None, None
    # The reader that says what the tensor is (a dynamo graph reads a conv weight's Shape first).
    node, i = next(((n, k) for n, k in uses if k in ROLE_OPS.get(n.op_type, ())), uses[0])
    after = None
    if node.op_type == "Unsqueeze":
        nxt = readers.get(node.output[0], [])
        after = nxt[0][0].op_type if nxt else None
    return node.op_type, i, node, after


def value_for(rng: np.random.Generator, shape: list[int], op: str, index: int,
              node: onnx.NodeProto | None, after: str | None) -> np.ndarray:
    """A plausible random value for a weight of ``shape`` read as input ``index`` of ``op``."""
    if op in ("Conv", "ConvTranspose") and index == 1 and len(shape) > 1:
        fan_in = math.prod(shape[1:]) if op == "Conv" else shape[0] * math.prod(shape[2:])
        return rng.standard_normal(shape) * math.sqrt(2.0 / max(1, fan_in))
    if op in ("Transpose", "Reshape") and len(shape) >= 2:  # a weight relaid at run time
        return rng.standard_normal(shape) * math.sqrt(2.0 / max(1, math.prod(shape[1:])))
    if op in ("Gemm", "MatMul") and index == 1 and len(shape) == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node else 0
        fan_in = shape[1] if trans_b else shape[0]
        return rng.standard_normal(shape) * math.sqrt(2.0 / max(1, fan_in))
    if (op == "BatchNormalization" and index in (1, 4)) or \
            (op in ("LayerNormalization", "InstanceNormalization") and index == 1) or \
            (op in ("Mul", "Div") or after == "Mul"):
        return rng.uniform(0.5, 1.5, size=shape)
    if op == "BatchNormalization" and index == 3:
        return rng.standard_normal(shape) * 0.1
    if op == "PRelu":
        return rng.uniform(0.05, 0.3, size=shape)
    return rng.standard_normal(shape) * 0.05


def materialise(model: onnx.ModelProto, seed: int = 0, redraw: bool = False
                ) -> onnx.ModelProto:
    """Replace every ``ConstantOfShape`` placeholder fed by a constant shape with a random
    initializer of that shape (``redraw``: the role-known float initializers too). Returns a
    new model; IR < 4 keeps its initializers declared as graph inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in g.initializer}
    readers = _readers(g)
    keep, new = [], []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None or value.data_type == onnx.TensorProto.FLOAT:
                shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]]).reshape(-1)]
                op, i, user, after = _role(node.output[0], readers)
                arr = value_for(rng, shape, op, i, user, after).astype(np.float32)
                new.append(numpy_helper.from_array(arr, node.output[0]))
                continue
        keep.append(node)
    if redraw:
        for t in g.initializer:
            op, i, user, after = _role(t.name, readers)
            if t.data_type == onnx.TensorProto.FLOAT and i in ROLE_OPS.get(op, ()):
                arr = value_for(rng, list(t.dims), op, i, user, after).astype(np.float32)
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
    del g.node[:]
    g.node.extend(keep)
    used = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    dead = {t.name for t in g.initializer if t.name not in used}
    kept = [t for t in g.initializer if t.name not in dead]
    del g.initializer[:]
    g.initializer.extend(kept + new)
    inputs = [i for i in g.input if i.name not in dead]
    del g.input[:]
    g.input.extend(inputs)
    if m.ir_version < 4:  # IR 3: every initializer is a graph input too
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in new)
    return m


def skeletonise(model: onnx.ModelProto, min_size: int = 2) -> onnx.ModelProto:
    """The inverse: every role-known float initializer of at least ``min_size`` elements
    becomes ``ConstantOfShape(shape)`` (value 0.02) computing a tensor of the same name, put
    before the first node. Other initializers (shapes, scalars, indices) stay."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    readers = _readers(g)
    nodes, shapes, drop = [], [], set()
    for t in g.initializer:
        op, i, _, _ = _role(t.name, readers)
        if t.data_type != onnx.TensorProto.FLOAT or math.prod(t.dims) < min_size or \
                i not in ROLE_OPS.get(op, ()):
            continue
        drop.add(t.name)
        shape_name = f"{t.name}__SHAPE"
        shapes.append(numpy_helper.from_array(np.asarray(list(t.dims), dtype=np.int64),
                                              shape_name))
        nodes.append(helper.make_node(
            "ConstantOfShape", [shape_name], [t.name], name=f"{t.name}__light",
            value=numpy_helper.from_array(np.asarray([PLACEHOLDER], dtype=np.float32))))
    kept = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + shapes)
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    if m.ir_version < 4:
        inputs = [i for i in g.input if i.name not in drop]
        del g.input[:]
        g.input.extend(inputs)
        g.input.extend(helper.make_tensor_value_info(t.name, onnx.TensorProto.INT64,
                                                     list(t.dims)) for t in shapes)
    return m
