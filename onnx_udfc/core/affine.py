"""Fold per-channel constant ``Mul``/``Add`` nodes into the BatchNormalization or Conv before
them.

Caffe2-era exports (the ONNX model zoo's ``light`` models, Inception v2, DenseNet) write a
BatchNorm as ``BatchNormalization -> Mul(scale) -> Add(shift)`` or a Conv's affine as ``Conv ->
Mul -> Add``, each constant shaped ``[C, 1, 1]``. The channel analysis would see a per-channel
op between a layer and its activation and refuse to compensate across it; folded, the layer
carries the affine itself, exactly (``s * x + b`` then ``* m + a`` is ``(s m) x + (b m + a)``).
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc.core.builder import unique_namer
from onnx_udfc.core.io import tensor_array

FOLDABLE_PRODUCERS = ("BatchNormalization", "Conv")


def fold_channel_affine(model: onnx.ModelProto) -> int:
    """Fold every foldable ``Mul``/``Add`` (module docstring) in place; returns how many."""
    folded = 0
    while True:
        step = _fold_one(model)
        if not step:
            return folded
        folded += 1


def _fold_one(model: onnx.ModelProto) -> bool:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer_of = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for sub_owner in g.node:  # a tensor read inside a subgraph counts as read
        for a in sub_owner.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for n in sub.node:
                    for i in n.input:
                        readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            continue
        for x, const in (node.input, tuple(reversed(node.input))):
            producer = producer_of.get(x)
            if producer is None or producer.op_type not in FOLDABLE_PRODUCERS \
                    or const not in inits or readers.get(x, 0) != 1 or x in outputs \
                    or len(producer.output) != 1:
                continue
            params = _params(producer, inits)
            if params is None or _rank(producer, producer_of, inits) != 4:
                continue
            value = _per_channel(tensor_array(inits[const]), len(params[0]))
            if value is None:
                continue
            scale, shift, dtype = params
            if node.op_type == "Mul":
                scale, shift = scale * value, shift * value
            else:
                shift = shift + value
            _write(model, producer, inits, scale, shift, dtype)
            producer.output[0] = node.output[0]
            g.node.remove(node)
            return True
    return False


# Ops whose output has the rank of their first input: a BatchNorm's input rank is found by
# walking back through them to a Conv (DenseNet normalises a Concat of pooled Conv outputs).
RANK_KEEPING = ("BatchNormalization", "Concat", "MaxPool", "AveragePool", "Relu", "LeakyRelu",
                "Clip")


def _rank(producer: onnx.NodeProto, producer_of: dict[str, onnx.NodeProto],
          inits: dict[str, onnx.TensorProto]) -> int | None:
    """The rank of the producer's output, where weights tell it: a Conv's weight rank, found
    for a BatchNorm through the rank-keeping ops before it."""
    while producer.op_type in RANK_KEEPING and producer.input:
        before = producer_of.get(producer.input[0])
        if before is None:
            return None
        producer = before
    if producer.op_type != "Conv":
        return None
    weight = inits.get(producer.input[1]) if len(producer.input) > 1 else None
    return None if weight is None else len(weight.dims)


def _params(producer: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
            ) -> tuple[np.ndarray, np.ndarray, np.dtype] | None:
    """The producer's per-channel scale and shift (Conv: ones and its bias)."""
    if producer.op_type == "BatchNormalization":
        if len(producer.input) < 5 or any(i not in inits for i in producer.input[1:3]):
            return None
        scale = tensor_array(inits[producer.input[1]])
        return scale.astype(np.float64), tensor_array(inits[producer.input[2]]).astype(
            np.float64), scale.dtype
    if len(producer.input) < 2 or producer.input[1] not in inits:
        return None
    w = tensor_array(inits[producer.input[1]])
    if not np.issubdtype(w.dtype, np.floating):
        return None
    bias = np.zeros(w.shape[0])
    if len(producer.input) > 2 and producer.input[2]:
        if producer.input[2] not in inits:
            return None
        bias = tensor_array(inits[producer.input[2]]).astype(np.float64)
    return np.ones(w.shape[0]), bias, w.dtype


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel of an ``[N, C, H, W]`` tensor, or None when it is
    not shaped ``[C, 1, 1]`` / ``[1, C, 1, 1]`` (or a scalar)."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    shape = list(value.shape)
    while shape and shape[0] == 1 and len(shape) > 3:
        shape.pop(0)
    if len(shape) != 3 or shape[0] != channels or shape[1:] != [1, 1]:
        return None
    return value.reshape(-1).astype(np.float64)


def _write(model: onnx.ModelProto, producer: onnx.NodeProto,
           inits: dict[str, onnx.TensorProto], scale: np.ndarray, shift: np.ndarray,
           dtype: np.dtype) -> None:
    """New initializers (never shared) holding the folded scale and shift."""
    from onnx import numpy_helper

    fresh = unique_namer(set(inits))
    label = producer.name or producer.output[0]
    if producer.op_type == "BatchNormalization":
        names = [fresh(f"{label}.folded_scale"), fresh(f"{label}.folded_bias")]
        model.graph.initializer.extend([numpy_helper.from_array(scale.astype(dtype), names[0]),
                                        numpy_helper.from_array(shift.astype(dtype), names[1])])
        producer.input[1], producer.input[2] = names
        return
    w = tensor_array(inits[producer.input[1]]).astype(np.float64)
    w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    names = [fresh(f"{label}.folded_weight"), fresh(f"{label}.folded_bias")]
    model.graph.initializer.extend([numpy_helper.from_array(w.astype(dtype), names[0]),
                                    numpy_helper.from_array(shift.astype(dtype), names[1])])
    producer.input[1] = names[0]
    if len(producer.input) > 2:
        producer.input[2] = names[1]
    else:
        producer.input.append(names[1])
