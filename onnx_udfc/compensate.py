"""Graph-level glue between the channel analysis and the closed-form solver (:mod:`solve`).

For a layer L the *absorbers* are the weight layers that read L's output channels through ops
that keep each channel separate (activations, pooling, Flatten/Reshape, Concat, Split, Slice,
Pad, Transpose, ...). A reconstruction ``X_j ~ sum_i s_i X_i`` of a pruned channel, or a scale
``X_m ~ s~_m Xq_m`` of a quantized one, is folded into the absorbers' input columns (Eq. 8 and
Eq. 9). Where L's channels also reach something that mixes them differently (a residual Add, a
per-channel affine op, a graph output, a depthwise Conv for cross-channel sums) no absorber can
take the correction: the layer is reported "not compensated" with the reason and is pruned or
quantized plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_udfc.graph import ChannelAnalysis
from onnx_udfc.io import set_tensor_array, tensor_array
from onnx_udfc.rules import ELEMENTWISE_UNARY, SPATIAL, attr
from onnx_udfc.stats import LayerWeights, follower_batchnorm, weight_layer

TRANSPARENT = set(ELEMENTWISE_UNARY) | set(SPATIAL) | {
    "Flatten", "Reshape", "Concat", "Split", "Slice", "Gather", "Pad", "Transpose", "Squeeze",
    "Unsqueeze", "Resize", "Upsample", "ReduceMean", "ReduceMax"} - {"Cast", "CastLike"}


@dataclass
class Absorber:
    """A weight layer reading ``tensor`` whose input columns can take a correction."""

    layer: LayerWeights
    tensor: str


def absorbers(node: onnx.NodeProto, ctx: ChannelAnalysis,
              cross_channel: bool) -> tuple[list[Absorber], str | None]:
    """The layers that read ``node``'s output channels, or the reason none can absorb.

    ``cross_channel``: the correction mixes channels (pruning), which a depthwise Conv cannot
    take; a per-channel scale (quantization) it can.
    """
    outputs = {o.name for o in ctx.graph.output}
    bn = follower_batchnorm(node, ctx.consumers, outputs)
    found: list[Absorber] = []
    stack, seen = [node.output[0]], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in outputs:
            return [], f"its channels reach graph output '{t}'"
        for c in ctx.consumers.get(t, []):
            label = f"{c.op_type} '{c.name or c.output[0]}'"
            if c is bn or (bn is not None and c.output[0] == bn.output[0]):
                stack.append(c.output[0])
                continue
            if c.input[0] != t:
                return [], f"its channels enter {label} as a parameter"
            layer = weight_layer(c, ctx.inits)
            if c.op_type in ("Conv", "Gemm", "MatMul") and layer is not None:
                groups = int(attr(c, "group", 1))
                depthwise = groups == _channels(c, ctx) and \
                    int(ctx.inits[c.input[1]].dims[0]) == groups
                if groups == 1 or (not cross_channel and depthwise):
                    if c.op_type == "Conv" and groups > 1:
                        layer = LayerWeights(c, c.input[1], 0, 0)
                    found.append(Absorber(layer, t))
                    continue
                return [], f"its channels pass through grouped/depthwise {label}"
            if c.op_type in TRANSPARENT:
                stack.extend(o for o in c.output if o)
                continue
            return [], f"its channels feed {label}"
    if not found:
        return [], "no layer reads its channels"
    return found, None


def _channels(node: onnx.NodeProto, ctx: ChannelAnalysis) -> int:
    w = ctx.inits[node.input[1]]
    return int(w.dims[1]) * int(attr(node, "group", 1))


def _positions(ctx: ChannelAnalysis, tensor: str, classes: np.ndarray) -> np.ndarray | None:
    """``[len(classes), m]`` positions of each class along ``tensor``'s channel axis (each
    channel may occupy m positions, e.g. a Flatten block). None if a class is missing or the
    blocks are uneven."""
    info = ctx.tensors.get(tensor)
    if info is None or info.slots is None:
        return None
    roots = ctx.roots()[info.slots]
    pos = [np.flatnonzero(roots == c) for c in classes.tolist()]
    if not pos or len({len(p) for p in pos}) != 1 or len(pos[0]) == 0:
        return None
    return np.stack(pos)


class ColumnView:
    """An absorber's weight as ``[input positions, rest]`` in float64, written back on exit."""

    def __init__(self, ctx: ChannelAnalysis, absorber: Absorber) -> None:
        self.init = ctx.inits[absorber.layer.weight]
        w = tensor_array(self.init)
        self.dtype, self.shape = w.dtype, w.shape
        self.axis = absorber.layer.in_axis
        moved = np.moveaxis(w.astype(np.float64), self.axis, 0)
        self.moved_shape = moved.shape
        self.cols = moved.reshape(moved.shape[0], -1).copy()

    def write(self) -> None:
        w = np.moveaxis(self.cols.reshape(self.moved_shape), 0, self.axis)
        set_tensor_array(self.init, w.astype(self.dtype))


def apply_reconstruction(ctx: ChannelAnalysis, found: list[Absorber], kept_cls: np.ndarray,
                         pruned_cls: np.ndarray, coefficients: np.ndarray) -> list[str]:
    """Eq. 8 in every absorber: ``W'[:, i] += sum_j s_ji W'[:, j]`` (per block position).

    Returns the absorbers that could not be updated (a channel missing from their input)."""
    skipped = []
    for ab in found:
        pk, pp = _positions(ctx, ab.tensor, kept_cls), _positions(ctx, ab.tensor, pruned_cls)
        if pk is None or pp is None or pk.shape[1] != pp.shape[1]:
            skipped.append(ab.layer.node.name)
            continue
        view = ColumnView(ctx, ab)
        for k in range(pk.shape[1]):
            view.cols[pk[:, k]] += coefficients.T @ view.cols[pp[:, k]]
        view.write()
    return skipped


def apply_scales(ctx: ChannelAnalysis, found: list[Absorber], classes: np.ndarray,
                 scales: np.ndarray) -> list[str]:
    """Eq. 9 in every absorber: ``W'[:, m] *= s~_m`` on every position of channel m."""
    skipped = []
    for ab in found:
        pos = _positions(ctx, ab.tensor, classes)
        if pos is None:
            skipped.append(ab.layer.node.name)
            continue
        view = ColumnView(ctx, ab)
        view.cols[pos] *= scales[:, None, None]
        view.write()
    return skipped


def weight_uses(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses
