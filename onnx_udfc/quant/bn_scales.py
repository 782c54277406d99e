"""Fold BatchNormalization into the dequantization scales of an integer-stored Conv.

``BN(Conv(x, W))`` with ``W = (q - z) * s`` equals ``Conv(x, (q - z) * s * g) + bias'`` with
``g = gamma / sqrt(var + eps)`` per output channel: the integer codes ``q`` stay exactly as
quantized, only the per-channel scale and the bias change. Unlike folding BN before
quantization (``--fold-bn``), this leaves the quantization grid, and so the accuracy, untouched,
while the file loses the four BN vectors and the BN nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.graph_edit import cleanup
from onnx_udfc.core.graph_index import GraphIndex
from onnx_udfc.core.io import opset_version, tensor_array
from onnx_udfc.ops.base import attr, set_attr
from onnx_udfc.quant.qdq import integer_tensor

_INTEGER_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
                  onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4"}


def fold_bn_into_scales(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """Fold every BN that follows a Conv whose weight is ``DequantizeLinear`` output (in place).

    Returns the number folded and, for the BNs left alone, why.
    """
    g = model.graph
    index = GraphIndex.of(g)
    inits, producer = index.inits, index.producer
    per_axis_ok = opset_version(model) >= 13
    folded, skipped, drop = 0, [], set()
    for bn, conv in index.batchnorms(g):
        dq = producer.get(conv.input[1]) if conv is not None and conv.op_type == "Conv" else None
        label = bn.name or bn.output[0]
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        if not index.private(bn.input[0]) or index.readers.get(conv.input[1]) != 1 \
                or not all(n in inits for n in list(bn.input[1:5]) + list(dq.input[1:])):
            skipped.append(f"{label}: shared tensors")
            continue
        gamma, beta, mean, var = (tensor_array(inits[n]).astype(np.float64)
                                  for n in bn.input[1:5])
        factor = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        negative = factor < 0
        symmetric = len(dq.input) < 3 or not dq.input[2]
        if np.any(factor == 0) or (negative.any() and not symmetric):
            skipped.append(f"{label}: zero gamma, or negative gamma with a zero point")
            continue
        scale = tensor_array(inits[dq.input[1]]).astype(np.float64)
        block = attr(dq, "block_size", 0)
        axis = attr(dq, "axis", 1)
        if scale.ndim == 0 or scale.size == 1:
            if not per_axis_ok:
                skipped.append(f"{label}: per-channel scales need opset 13")
                continue
            scale = np.full(len(factor), float(scale.reshape(-1)[0]))
            set_attr(dq, "axis", 0)
            if len(dq.input) > 2 and dq.input[2]:
                zp_init = inits[dq.input[2]]
                zp = int(np.asarray(numpy_helper.to_array(zp_init)).reshape(-1)[0])
                kind = _INTEGER_TYPES[zp_init.data_type]
                zp_init.CopyFrom(integer_tensor(zp_init.name, np.full(len(factor), zp), kind))
        elif not block and axis != 0:
            skipped.append(f"{label}: scales along axis {axis}")
            continue
        if negative.any():  # symmetric codes: negate the channel instead of the scale
            q_init = inits[dq.input[0]]
            codes = np.asarray(numpy_helper.to_array(q_init)).astype(np.int64)
            codes[negative] = -codes[negative]
            q_init.CopyFrom(integer_tensor(q_init.name, codes, _INTEGER_TYPES[q_init.data_type]))
        new_scale = scale * np.abs(factor).reshape((-1,) + (1,) * (scale.ndim - 1))
        _replace(inits[dq.input[1]], new_scale.astype(np.float32))
        bias = np.zeros_like(factor)
        if len(conv.input) > 2 and conv.input[2]:
            bias = tensor_array(inits[conv.input[2]]).astype(np.float64)
        new_bias = (bias - mean) * factor + beta
        name = f"{conv.name or conv.output[0]}.bias_bn_folded"
        g.initializer.append(numpy_helper.from_array(new_bias.astype(np.float32), name))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = name
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    if drop:
        for i in range(len(g.node) - 1, -1, -1):
            if id(g.node[i]) in drop:
                del g.node[i]
        cleanup(model)
    return folded, skipped


def _replace(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    new = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    tensor.Clear()
    tensor.CopyFrom(new)
