"""Pooling: channels pass through while they sit on axis 1. Channel rule, traits, moments and
reverse pass of each pooling op."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.activations import PassThrough
from onnx_udfc.ops.base import attrs
from onnx_udfc.ops.registry import SEPARATE, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments, passed_through


class SpatialPassThrough(PassThrough):
    """Pooling: channels pass through as long as they sit on axis 1."""

    spatial = True


def pooled_moments(step: MomentStep) -> TensorMoments:
    """The mean over the spatial positions: their correlation ``r`` is what survives."""
    x, r = step.x, step.spatial
    return TensorMoments(x.mean, x.cov * ((1.0 - r) / max(x.hw, 1) + r), 1)


def _maxpool_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                  ) -> dict[str, str] | None:
    """``dy`` scattered to the arg-max of each window (MaxPool's own Indices output, flat
    over the whole input); overlapping windows add up, which needs opset 16."""
    x, a = node.input[0], attrs(node)
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


def _avgpool_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                  ) -> dict[str, str] | None:
    """AveragePool is a depthwise convolution with a constant kernel ``1/area``: its transpose
    is the ConvTranspose with that kernel (exact when padding counts, or there is none)."""
    x, y, a = node.input[0], node.output[0], attrs(node)
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


def _global_avgpool_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                         ) -> dict[str, str] | None:
    x = node.input[0]
    if x not in shapes:
        return None
    area = float(np.prod(shapes[x][2:]))
    scaled = b.op("Mul", [dy, b.const(np.asarray(1.0 / area, np.float32))])
    return {x: b.op("Expand", [scaled, b.const(np.asarray(shapes[x], np.int64))])}


POOL = SpatialPassThrough()
define("MaxPool", rule=POOL, traits=SEPARATE, propagate=passed_through, backward=_maxpool_grad)
define("AveragePool", rule=POOL, traits=SEPARATE, propagate=passed_through,
       backward=_avgpool_grad)
define("GlobalAveragePool", rule=POOL, traits=SEPARATE, propagate=pooled_moments,
       backward=_global_avgpool_grad)
define("GlobalMaxPool", "LpPool", "GlobalLpPool", "MaxRoiPool", rule=POOL, traits=SEPARATE)
