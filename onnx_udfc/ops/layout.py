"""The layout ops (Flatten, Reshape, Transpose, Squeeze, Unsqueeze), reductions, Resize and
Shape: channel rules, traits, moments and reverse passes. Index maps (Concat, Split, Slice,
Gather) live in :mod:`onnx_udfc.ops.index`, Pad in :mod:`onnx_udfc.ops.pad`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import Rule, attr, input_or_attr, norm_axis
from onnx_udfc.ops.pooling import pooled_moments
from onnx_udfc.ops.registry import SEPARATE, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments, passed_through

SYMBOLIC_BATCH = 1_000_003  # a large prime standing in for a symbolic batch dimension
MAX_FEATURES = 4096  # Flatten expansion limit (covariance size)


def _static(dims) -> list[int] | None:
    """Dims with a symbolic batch replaced by a large prime, so products stay checkable."""
    if dims is None:
        return None
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif i == 0:
            out.append(SYMBOLIC_BATCH)
        else:
            return None
    return out


def block_map(in_dims: list[int], axis: int, out_dims: list[int]) -> tuple[int, int, int] | None:
    """Where the channel axis of ``in_dims`` lands after a row-major reshape to ``out_dims``.

    Returns (out_axis, repeat, tile): output axis ``out_axis`` holds, for each of ``tile``
    merged leading positions, every channel repeated ``repeat`` times (the trailing positions
    merged with it). None when the channel axis is split or scattered.
    """
    c = in_dims[axis]
    for lead in range(axis + 1):
        tile = math.prod(in_dims[axis - lead:axis])
        outer = math.prod(in_dims[:axis - lead])
        for trail in range(len(in_dims) - axis):
            repeat = math.prod(in_dims[axis + 1:axis + 1 + trail])
            inner = math.prod(in_dims[axis + 1 + trail:])
            for b in range(len(out_dims)):
                if math.prod(out_dims[:b]) == outer and out_dims[b] == tile * c * repeat \
                        and math.prod(out_dims[b + 1:]) == inner:
                    return b, repeat, tile
    return None


class _Relayout(Rule):
    """Shared by Flatten and Reshape: channels become blocks of the merged axis."""

    def out_dims(self, node, ctx, in_dims):
        raise NotImplementedError

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        if info.axis is None:
            ctx.set(node.output[0], None, None, info.opaque_reason)
            return None
        in_dims = _static(ctx.shape(node.input[0]))
        out_dims = self.out_dims(node, ctx, in_dims) if in_dims is not None else None
        if out_dims is None:
            return f"{node.op_type} with unknown or run-time shapes"
        mapped = block_map(in_dims, info.axis, out_dims)
        if mapped is None:
            return f"{node.op_type} splits or scatters the channel axis"
        b, repeat, tile = mapped
        if tile % SYMBOLIC_BATCH == 0:
            # The symbolic batch is merged into the channel axis (e.g. Reshape to [-1]); tiling
            # the slots by the placeholder batch would allocate millions of them.
            return f"{node.op_type} merges the batch axis into the channel axis"
        slots = ctx.slots(node.input[0], info.axis)
        ctx.set(node.output[0], b, np.tile(np.repeat(slots, repeat), tile))
        return None


class Flatten(_Relayout):
    def out_dims(self, node, ctx, in_dims):
        k = norm_axis(int(attr(node, "axis", 1)), len(in_dims))
        return [math.prod(in_dims[:k]), math.prod(in_dims[k:])]


class Reshape(_Relayout):
    def out_dims(self, node, ctx, in_dims):
        shape = ctx.const(node.input[1])
        if shape is None:
            return None
        return resolve_reshape(in_dims, shape.reshape(-1).tolist(), int(attr(node, "allowzero", 0)))

    def rewrite(self, node, rw):
        x, out = node.input[0], node.output[0]
        keep = rw.keep(out)
        if keep is None:
            return
        shape = rw.const(node.input[1]).reshape(-1).copy()
        b = rw.axis(out)
        if shape[b] == -1 or (shape[b] == 0 and b == rw.axis(x) and rw.size(out) == rw.size(x)):
            return
        shape[b] = len(keep)
        rw.set_const(node, 1, shape.astype(np.int64))


def resolve_reshape(in_dims: list[int], shape: list[int], allowzero: int) -> list[int] | None:
    out = [in_dims[i] if (s == 0 and not allowzero and i < len(in_dims)) else s
           for i, s in enumerate(shape)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(in_dims)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if math.prod(out) == math.prod(in_dims) else None


class Transpose(Rule):
    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        perm = list(attr(node, "perm", list(range(rank - 1, -1, -1)) if rank else []))
        axis = None if info.axis is None else perm.index(info.axis)
        ctx.set(node.output[0], axis, info.slots, info.opaque_reason)
        return None


class SqueezeUnsqueeze(Rule):
    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        axes, found = input_or_attr(node, ctx, 1, "axes")
        if not found:
            return f"{node.op_type} axes computed at run time"
        in_rank, out_rank = ctx.rank(node.input[0]), ctx.rank(node.output[0])
        if info.axis is None:
            ctx.set(node.output[0], None, None, info.opaque_reason)
            return None
        if node.op_type == "Squeeze":
            if axes is None:
                shape = ctx.shape(node.input[0])
                axes = [i for i, d in enumerate(shape) if d == 1]
            axes = {norm_axis(int(a), in_rank) for a in axes}
            if info.axis in axes:
                return "Squeeze removes the channel axis"
            axis = info.axis - sum(a < info.axis for a in axes)
        else:
            inserted = {norm_axis(int(a), out_rank) for a in axes}
            kept = [i for i in range(out_rank) if i not in inserted]
            axis = kept[info.axis]
        ctx.set(node.output[0], axis, info.slots)
        return None


class Reduce(Rule):
    """Reductions over non-channel axes (e.g. spatial ReduceMean) pass channels through."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        axes, found = input_or_attr(node, ctx, 1, "axes")
        if not found:
            return f"{node.op_type} axes computed at run time"
        if not axes:
            if attr(node, "noop_with_empty_axes", 0):
                ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
                return None
            axes = list(range(rank))
        axes = {norm_axis(int(a), rank) for a in axes}
        if info.axis is None:
            ctx.set(node.output[0], None, None, info.opaque_reason)
            return None
        if info.axis in axes:
            return f"{node.op_type} reduces over the channel axis"
        keepdims = int(attr(node, "keepdims", 1))
        axis = info.axis if keepdims else info.axis - sum(a < info.axis for a in axes)
        ctx.set(node.output[0], axis, info.slots)
        return None


class Resize(Rule):
    """Spatial resampling; an explicit ``sizes`` input holds the channel count."""

    def _operands(self, node):
        if node.op_type == "Upsample" or len(node.input) < 3:
            return (node.input[1] if len(node.input) > 1 else ""), ""
        return node.input[2], (node.input[3] if len(node.input) > 3 else "")

    @staticmethod
    def _position(node, axis: int | None, rank: int | None, count: int) -> int | None:
        """Where ``axis`` sits in the scales/sizes operand: Resize-18 may list only ``axes``."""
        if axis is None:
            return None
        axes = attr(node, "axes") if node.op_type == "Resize" else None
        if axes is None:
            return axis if axis < count else None
        if rank is None:
            return None
        axes = [norm_axis(int(a), rank) for a in axes]
        return axes.index(axis) if axis in axes else None

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        scales_name, sizes_name = self._operands(node)
        if any(ctx.channels(n) is not None for n in node.input[1:] if n):
            if not sizes_name or ctx.const(sizes_name) is None:
                return f"{node.op_type} target computed at run time"
        rank = ctx.rank(node.input[0])
        scales = ctx.const(scales_name) if scales_name else attr(node, "scales")
        if scales is not None and len(np.asarray(scales).reshape(-1)):
            scales = np.asarray(scales).reshape(-1)
            k = self._position(node, info.axis, rank, len(scales))
            if k is not None and float(scales[k]) != 1.0:
                return f"{node.op_type} rescales the channel axis"
        sizes = ctx.const(sizes_name) if sizes_name else None
        if sizes is not None and info.slots is not None and len(sizes.reshape(-1)):
            k = self._position(node, info.axis, rank, len(sizes.reshape(-1)))
            if k is not None and int(sizes.reshape(-1)[k]) != len(info.slots):
                return f"{node.op_type} rescales the channel axis"
        ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        return None

    def rewrite(self, node, rw):
        keep = rw.keep(node.output[0])
        _, sizes_name = self._operands(node)
        if keep is None or not sizes_name:
            return
        sizes = rw.const(sizes_name).copy()
        k = self._position(node, rw.axis(node.output[0]), rw.rank(node.input[0]), len(sizes))
        if k is None:
            return
        sizes[k] = len(keep)
        rw.set_const(node, 3, sizes.astype(np.int64))


class ShapeRead(Rule):
    """Reading a shape is harmless unless the channel count flows into a computation."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        if info.axis is None or info.slots is None:
            return None
        rank = ctx.rank(node.input[0])
        start = norm_axis(int(attr(node, "start", 0)), rank) if rank else 0
        end = attr(node, "end")
        end = rank if end is None or rank is None else min(norm_axis(int(end), rank), rank)
        if node.op_type == "Shape" and not start <= info.axis < end:
            return None
        position = info.axis - start
        if node.op_type == "Shape" and all(
                self._skips(c, ctx, position) for c in ctx.consumers.get(node.output[0], [])):
            return None
        ctx.fix(info.slots, f"channel count of '{node.input[0]}' is read at run time "
                            f"by '{node.name or node.op_type}'")
        return None

    @staticmethod
    def _skips(consumer: onnx.NodeProto, ctx, position: int) -> bool:
        if consumer.op_type == "Gather" and int(attr(consumer, "axis", 0)) == 0:
            idx = ctx.const(consumer.input[1])
            return idx is not None and position not in np.asarray(idx).reshape(-1).tolist()
        return False


def _patch(r: float, p: int) -> np.ndarray:
    return (1.0 - r) * np.eye(p) + r * np.ones((p, p))


def _flatten_moments(step: MomentStep) -> TensorMoments | None:
    """To a feature vector: the channels, or each channel's ``hw`` positions (correlated by
    ``r``, see :mod:`onnx_udfc.moments.propagated`)."""
    x = step.x
    shape = step.shapes.get(step.node.output[0])
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        return None
    f = int(shape[1])
    if f == x.mean.size:
        return TensorMoments(x.mean, x.cov, 1)
    if f != x.mean.size * x.hw:
        return None
    mean = np.repeat(x.mean, x.hw)
    if step.full and f <= MAX_FEATURES:
        return TensorMoments(mean, np.kron(x.full, _patch(step.spatial, x.hw)), 1)
    return TensorMoments(mean, np.repeat(x.var, x.hw), 1)


def _reshape_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                  ) -> dict[str, str] | None:
    x = node.input[0]
    if x not in shapes:
        return None
    return {x: b.op("Reshape", [dy, b.const(np.asarray(shapes[x], np.int64))])}


define("Flatten", rule=Flatten(), traits=SEPARATE, propagate=_flatten_moments,
       backward=_reshape_grad)
define("Reshape", rule=Reshape(), traits=SEPARATE, propagate=_flatten_moments,
       backward=_reshape_grad)
define("Squeeze", "Unsqueeze", rule=SqueezeUnsqueeze(), traits=SEPARATE, backward=_reshape_grad)
define("Transpose", rule=Transpose(), traits=SEPARATE)
define("ReduceMean", rule=Reduce(), traits=SEPARATE, propagate=pooled_moments)
define("ReduceMax", rule=Reduce(), traits=SEPARATE)
define("ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
       "ReduceLogSumExp", "ReduceSumSquare", rule=Reduce())
define("Resize", "Upsample", rule=Resize(), traits=SEPARATE, propagate=passed_through)
define("Shape", "Size", rule=ShapeRead())
