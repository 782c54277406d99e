"""The reverse pass of a network's ops as ONNX nodes, for :mod:`onnx_udfc.moments.inverted`.

:func:`backward` takes a forward node and the name of the gradient at its first output and
appends the nodes computing the gradients at its inputs: Conv by ConvTranspose with the same
weights, BN (inference form) and activations by their elementwise derivatives, Add/Sub/Mul by
fan-out, Gemm/MatMul by the transposed constant weight, pooling and shape ops by their
transposes. An op without a rule returns None (the caller stops the gradient there).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_udfc.core.builder import Builder


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _slice_transpose(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict,
                     inits: dict) -> str | None:
    """The transpose of a Slice: ``dy`` scattered into zeros where the slice read."""
    x = node.input[0]
    if x not in shapes or b.opset < 11:
        return None
    shape = shapes[x]
    if b.opset >= 10:
        if any(n and n not in inits for n in node.input[1:]) or len(node.input) < 3:
            return None
        args = [numpy_helper.to_array(inits[n]) if n else None for n in node.input[1:]]
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 and args[2] is not None else np.arange(len(starts))
        steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(len(starts),
                                                                               np.int64)
    else:  # pragma: no cover - opset 9 slices carry attributes (no ScatterElements there)
        return None
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    sl = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        sl[int(a) % len(shape)] = slice(int(s), int(max(min(e, 1 << 62), -(1 << 62))), int(st))
    picked = index[tuple(sl)].reshape(-1)
    zeros = b.const(np.zeros(index.size, np.float32), "zeros")
    flat = b.op("Reshape", [dy, b.const(np.asarray([-1], np.int64))])
    scattered = b.op("ScatterElements", [zeros, b.const(picked, "idx"), flat], axis=0)
    return b.op("Reshape", [scattered, b.const(np.asarray(shape, np.int64))])


def _maxpool_transpose(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict,
                       a: dict) -> dict[str, str] | None:
    """``dy`` scattered to the arg-max of each window (MaxPool's own Indices output, flat
    over the whole input); overlapping windows add up, which needs opset 16."""
    x = node.input[0]
    k, strides = a.get("kernel_shape", []), a.get("strides", [1] * len(a.get("kernel_shape", [])))
    overlap = any(kk > s for kk, s in zip(k, strides, strict=False)) or any(
        d != 1 for d in a.get("dilations", []))
    if (x not in shapes or b.opset < 11 or (overlap and b.opset < 16)
            or a.get("storage_order", 0) != 0):
        return None
    if len(node.output) < 2 or not node.output[1]:
        del node.output[1:]
        node.output.append(b.name("argmax"))
    size = int(np.prod(shapes[x]))
    flat = b.const(np.asarray([-1], np.int64))
    extra = {"reduction": "add"} if b.opset >= 16 else {}
    scattered = b.op("ScatterElements", [b.const(np.zeros(size, np.float32), "zeros"),
                                         b.op("Reshape", [node.output[1], flat]),
                                         b.op("Reshape", [dy, flat])], axis=0, **extra)
    return {x: b.op("Reshape", [scattered, b.const(np.asarray(shapes[x], np.int64))])}


def _linear_transpose(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict,
                      a: dict) -> dict[str, str] | None:
    """Gemm / MatMul with a constant right-hand side: ``dA = dY B^T`` (times alpha, transposed
    back under transA)."""
    x, w = node.input[0], node.input[1]
    if w not in inits or x in inits or x not in shapes or (
            len(node.input) > 2 and node.input[2] and node.input[2] not in inits):
        return None
    weight = numpy_helper.to_array(inits[w]).astype(np.float64)
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        weight = (weight.T if a.get("transB", 0) else weight) * a.get("alpha", 1.0)
    g = b.op("MatMul", [dy, b.const(np.ascontiguousarray(weight.T).astype(np.float32), "wt")])
    if node.op_type == "Gemm" and a.get("transA", 0):
        g = b.op("Transpose", [g], perm=[1, 0])
    return {x: g}


def _avgpool_transpose(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, a: dict
                       ) -> dict[str, str] | None:
    """AveragePool is a depthwise convolution with a constant kernel ``1/area``: its transpose
    is the ConvTranspose with that kernel (exact when padding counts, or there is none)."""
    x, y = node.input[0], node.output[0]
    k = list(a.get("kernel_shape", []))
    nd = len(k)
    pads = list(a.get("pads", [0] * (2 * nd)))
    if (x not in shapes or y not in shapes or a.get("ceil_mode", 0)
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or any(d != 1 for d in a.get("dilations", [1] * nd))
            or (any(pads) and not a.get("count_include_pad", 0))):
        return None
    strides = list(a.get("strides", [1] * nd))
    xs, ys, c = shapes[x][2:], shapes[y][2:], shapes[x][1]
    outpad = [xs[i] - ((ys[i] - 1) * strides[i] - pads[i] - pads[i + nd] + k[i])
              for i in range(nd)]
    if any(p < 0 or p >= strides[i] for i, p in enumerate(outpad)):
        return None
    kernel = np.full([c, 1, *k], 1.0 / float(np.prod(k)), np.float32)
    return {x: b.op("ConvTranspose", [dy, b.const(kernel, "avgk")], kernel_shape=k,
                    strides=strides, pads=pads, group=c, output_padding=outpad)}


def backward(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
              ) -> dict[str, str] | None:
    """Gradients of ``node``'s non-constant inputs given ``dy`` at its first output, or None
    when there is no rule for it."""
    t, a, ins = node.op_type, attrs(node), node.input
    x = ins[0] if ins else ""
    if t in ("Identity", "Dropout"):
        return {x: dy}
    if t in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        if x not in shapes:
            return None
        return {x: b.op("Reshape", [dy, b.const(np.asarray(shapes[x], np.int64))])}
    if t == "Relu":
        return {x: b.op("Where", [b.op("Greater", [x, b.const(np.asarray(0, np.float32))]),
                                  dy, b.const(np.asarray(0, np.float32))])}
    if t == "LeakyRelu":
        alpha = b.const(np.asarray(a.get("alpha", 0.01), np.float32))
        return {x: b.op("Where", [b.op("Greater", [x, b.const(np.asarray(0, np.float32))]),
                                  dy, b.op("Mul", [dy, alpha])])}
    if t == "Clip":
        lo = a.get("min") if len(ins) < 2 or not ins[1] else (
            float(numpy_helper.to_array(inits[ins[1]])) if ins[1] in inits else None)
        hi = a.get("max") if len(ins) < 3 or not ins[2] else (
            float(numpy_helper.to_array(inits[ins[2]])) if ins[2] in inits else None)
        keep = None
        for bound, cmp in ((lo, "Greater"), (hi, "Less")):
            if bound is None:
                continue
            c = b.op(cmp, [x, b.const(np.asarray(bound, np.float32))])
            keep = c if keep is None else b.op("And", [keep, c])
        if keep is None:
            return {x: dy}
        return {x: b.op("Where", [keep, dy, b.const(np.asarray(0, np.float32))])}
    if t == "Sigmoid":
        s = node.output[0]
        one_minus = b.op("Sub", [b.const(np.asarray(1, np.float32)), s])
        return {x: b.op("Mul", [dy, b.op("Mul", [s, one_minus])])}
    if t == "BatchNormalization":
        if not all(n in inits for n in ins[1:5]):
            return None
        gamma = numpy_helper.to_array(inits[ins[1]]).astype(np.float64)
        var = numpy_helper.to_array(inits[ins[4]]).astype(np.float64)
        scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
        rank = len(shapes.get(x, [0, 0, 0, 0]))
        s = b.const(scale.reshape([1, -1] + [1] * (rank - 2)).astype(np.float32), "bnscale")
        return {x: b.op("Mul", [dy, s])}
    if t in ("Add", "Sub", "Mul"):
        out = {}
        yshape = shapes.get(node.output[0])
        for i, n in enumerate(ins[:2]):
            if n in inits:
                continue
            if shapes.get(n) != yshape:
                return None  # broadcast between activations: not needed by the nets we see
            g = dy
            if t == "Sub" and i == 1:
                g = b.op("Neg", [dy])
            if t == "Mul":
                g = b.op("Mul", [dy, ins[1 - i]])
            out[n] = g if n not in out else b.op("Add", [out[n], g])
        return out
    if t == "Conv":
        w = ins[1]
        if w not in inits or x not in shapes or node.output[0] not in shapes:
            return None
        k = list(numpy_helper.to_array(inits[w]).shape[2:])
        nd = len(k)
        strides = a.get("strides", [1] * nd)
        dil = a.get("dilations", [1] * nd)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        pads = a.get("pads", [0] * (2 * nd))
        xs, ys = shapes[x][2:], shapes[node.output[0]][2:]
        outpad = [xs[i] - ((ys[i] - 1) * strides[i] - pads[i] - pads[i + nd]
                           + dil[i] * (k[i] - 1) + 1) for i in range(nd)]
        if any(p < 0 or p >= max(strides[i], dil[i]) for i, p in enumerate(outpad)):
            return None
        return {x: b.op("ConvTranspose", [dy, w], kernel_shape=k, strides=strides, pads=pads,
                        dilations=dil, group=a.get("group", 1), output_padding=outpad)}
    if t == "Pad":
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant") or x not in shapes:
            return None
        pads = a.get("pads") if b.opset < 11 else (
            numpy_helper.to_array(inits[ins[1]]) if len(ins) > 1 and ins[1] in inits else None)
        if pads is None or (len(ins) > 3 and ins[3]):
            return None
        r = len(shapes[x])
        starts = np.asarray(pads[:r], np.int64)
        ends = starts + np.asarray(shapes[x], np.int64)
        if b.opset < 10:  # pragma: no cover - Slice takes attributes before opset 10
            return {x: b.op("Slice", [dy], starts=list(starts), ends=list(ends))}
        return {x: b.op("Slice", [dy, b.const(starts), b.const(ends)])}
    if t == "Slice":
        g = _slice_transpose(b, node, dy, shapes, inits)
        return None if g is None else {x: g}
    if t == "MaxPool":
        return _maxpool_transpose(b, node, dy, shapes, a)
    if t in ("Gemm", "MatMul"):
        return _linear_transpose(b, node, dy, shapes, inits, a)
    if t == "AveragePool":
        return _avgpool_transpose(b, node, dy, shapes, a)
    if t == "GlobalAveragePool":
        if x not in shapes:
            return None
        area = float(np.prod(shapes[x][2:]))
        scaled = b.op("Mul", [dy, b.const(np.asarray(1.0 / area, np.float32))])
        return {x: b.op("Expand", [scaled, b.const(np.asarray(shapes[x], np.int64))])}
    if t == "Concat":
        axis = a.get("axis", 0)
        out, offset = {}, 0
        for n in ins:
            if n not in shapes:
                return None
            size = shapes[n][axis]
            if n not in inits:
                part = b.op("Slice", [dy, b.const(np.asarray([offset], np.int64)),
                                      b.const(np.asarray([offset + size], np.int64)),
                                      b.const(np.asarray([axis], np.int64))])
                out[n] = part if n not in out else b.op("Add", [out[n], part])
            offset += size
        return out
    return None
