"""Channel rules of the data-movement ops: index maps (Concat, Split, Slice, Gather, Pad),
layout changes (Flatten, Reshape, Transpose, Squeeze, Unsqueeze), reductions, Resize and Shape.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnx_udfc.graph import SOURCE_ZERO
from onnx_udfc.rules import Elementwise, Rule, attr, input_or_attr, norm_axis, register, set_attr

INT64_MAX = np.iinfo(np.int64).max


@register("Concat")
class Concat(Rule):
    """On the channel axis: output channels are the inputs' channels at their offsets.
    On another axis: the inputs' channels are tied like a residual Add."""

    def analyse(self, node, ctx):
        rank = ctx.rank(node.output[0]) or ctx.rank(node.input[0])
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        known = {ctx.channels(n).axis for n in node.input if ctx.channels(n) is not None
                 and ctx.channels(n).axis is not None}
        if known and known != {axis}:
            return Elementwise().analyse(node, ctx)
        parts = []
        for n in node.input:
            value = ctx.const(n)
            if value is not None:
                fixed = ctx.new_slots(value.shape[axis])
                ctx.fix(fixed, "constant input of Concat")
                parts.append(fixed)
            else:
                parts.append(ctx.slots(n, axis))
        ctx.set(node.output[0], axis, np.concatenate(parts))
        return None

    def rewrite(self, node, rw):
        out = node.output[0]
        axis = norm_axis(int(attr(node, "axis", 0)), rw.rank(out))
        if rw.axis(out) != axis:
            Elementwise().rewrite(node, rw)


def _split_sizes(node, ctx_or_rw, axis_size: int) -> list[int] | None:
    sizes, found = input_or_attr(node, ctx_or_rw, 1, "split")
    if not found:
        return None
    if sizes is None:
        n = len(node.output)
        if attr(node, "num_outputs") is None:
            return [axis_size // n] * n
        # Split-18: chunks of ceil(size / n), the last one smaller.
        chunk = -(-axis_size // n)
        return [chunk] * (n - 1) + [axis_size - chunk * (n - 1)]
    return [int(s) for s in sizes]


@register("Split")
class Split(Rule):
    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        if info.axis != axis or info.slots is None:
            for out in node.output:
                ctx.set(out, info.axis, info.slots, info.opaque_reason)
            return None
        sizes = _split_sizes(node, ctx, len(info.slots))
        if sizes is None:
            return "Split sizes computed at run time"
        offsets = np.cumsum([0] + sizes)
        for out, start, stop in zip(node.output, offsets[:-1], offsets[1:], strict=True):
            ctx.set(out, axis, info.slots[start:stop])
        return None

    def rewrite(self, node, rw):
        if rw.axis(node.input[0]) != norm_axis(int(attr(node, "axis", 0)), rw.rank(node.input[0])):
            return
        if all(rw.keep(o) is None for o in node.output):
            return
        sizes = [len(rw.keep(o)) if rw.keep(o) is not None else rw.size(o) for o in node.output]
        if rw.opset >= 13:
            while len(node.input) < 2:
                node.input.append("")
            rw.set_const(node, 1, np.asarray(sizes, dtype=np.int64))
            for i, a in enumerate(node.attribute):
                if a.name == "num_outputs":
                    del node.attribute[i]
                    break
        else:
            set_attr(node, "split", sizes)


def _slice_params(node, ctx_or_rw):
    """(starts, ends, axes, steps) or None when any is computed at run time."""
    if ctx_or_rw.opset < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes = attr(node, "axes", list(range(len(starts))))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    parts = []
    for i in range(1, 5):
        if len(node.input) > i and node.input[i]:
            v = ctx_or_rw.const(node.input[i])
            if v is None:
                return None
            parts.append(np.asarray(v).reshape(-1).tolist())
        else:
            parts.append(None)
    starts, ends, axes, steps = parts
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


@register("Slice")
class Slice(Rule):
    """A slice of the channel axis maps output channel k to input channel start + k*step. The
    rewrite turns the channel part of the slice into a Gather with explicit indices, since the
    kept channels are no longer an arithmetic progression."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        params = _slice_params(node, ctx)
        if params is None:
            return "Slice bounds computed at run time"
        starts, ends, axes, steps = params
        axes = [norm_axis(int(a), rank) for a in axes]
        if info.slots is None or info.axis not in axes:
            ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
            return None
        k = axes.index(info.axis)
        sel = np.arange(len(info.slots))[slice(int(starts[k]), int(ends[k]), int(steps[k]))]
        ctx.set(node.output[0], info.axis, info.slots[sel])
        return None

    def rewrite(self, node, rw):
        x, out = node.input[0], node.output[0]
        if rw.keep(x) is None and rw.keep(out) is None:
            return
        starts, ends, axes, steps = _slice_params(node, rw)
        rank = rw.rank(x)
        axes = [norm_axis(int(a), rank) for a in axes]
        if rw.axis(x) not in axes:
            return
        k = axes.index(rw.axis(x))
        sel = np.arange(rw.size(x))[slice(int(starts[k]), int(ends[k]), int(steps[k]))]
        keep_in = rw.keep(x) if rw.keep(x) is not None else np.arange(rw.size(x))
        keep_out = rw.keep(out) if rw.keep(out) is not None else np.arange(len(sel))
        indices = np.searchsorted(keep_in, sel[keep_out]).astype(np.int64)
        gather = rw.make_gather(indices, rw.axis(x))
        if len(axes) == 1:
            rw.replace_node(node, gather(x, out))
            return
        starts[k], ends[k], steps[k] = 0, INT64_MAX, 1
        if rw.opset < 10:
            set_attr(node, "starts", [int(s) for s in starts])
            set_attr(node, "ends", [int(e) for e in ends])
        else:
            rw.set_const(node, 1, np.asarray(starts, dtype=np.int64))
            rw.set_const(node, 2, np.asarray(ends, dtype=np.int64))
            if len(node.input) > 4 and node.input[4]:
                rw.set_const(node, 4, np.asarray(steps, dtype=np.int64))
        mid = rw.fresh_name(out + "_channels")
        node.output[0] = mid
        rw.insert_after(node, gather(mid, out))


@register("Gather")
class Gather(Rule):
    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        idx = ctx.const(node.input[1])
        if ctx.channels(node.input[1]) is not None or idx is None:
            return "Gather with computed indices"
        rank = ctx.rank(node.input[0])
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        if info.axis is None or info.axis != axis:
            new_axis = None if info.axis is None else (
                info.axis if info.axis < axis else info.axis - 1 + idx.ndim)
            ctx.set(node.output[0], new_axis, info.slots, info.opaque_reason)
            return None
        if idx.ndim != 1:
            return "Gather of single channels"
        idx = np.where(idx < 0, idx + len(info.slots), idx)
        ctx.set(node.output[0], axis, info.slots[idx])
        return None

    def rewrite(self, node, rw):
        x, out = node.input[0], node.output[0]
        if rw.axis(x) != norm_axis(int(attr(node, "axis", 0)), rw.rank(x)):
            return
        if rw.keep(x) is None and rw.keep(out) is None:
            return
        idx = rw.const(node.input[1]).astype(np.int64)
        idx = np.where(idx < 0, idx + rw.size(x), idx)
        keep_in = rw.keep(x) if rw.keep(x) is not None else np.arange(rw.size(x))
        keep_out = rw.keep(out) if rw.keep(out) is not None else np.arange(len(idx))
        rw.set_const(node, 1, np.searchsorted(keep_in, idx[keep_out]).astype(np.int64))


@register("Pad")
class Pad(Rule):
    """Constant padding of the channel axis (ResNet 'option A' shortcuts): the padded channels
    are zero sources; removing one shortens the pad."""

    def _pads(self, node, ctx_or_rw, rank):
        pads, found = input_or_attr(node, ctx_or_rw, 1, "pads")
        if not found or pads is None:
            return None, None
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            value = ctx_or_rw.const(node.input[3])
            if value is None:
                return None, None
            axes = [norm_axis(int(a), rank) for a in value.reshape(-1)]
        return [int(p) for p in pads], axes

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        pads, axes = self._pads(node, ctx, rank)
        if pads is None:
            return "Pad amounts computed at run time"
        if info.axis is None or info.axis not in axes:
            ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
            return None
        k = axes.index(info.axis)
        before, after = pads[k], pads[k + len(axes)]
        if before == 0 and after == 0:
            ctx.set(node.output[0], info.axis, info.slots)
            return None
        mode = attr(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or before < 0 \
                or after < 0:
            return "Pad crops or reflects the channel axis"
        ctx.set(node.output[0], info.axis, np.concatenate([
            ctx.new_slots(before, SOURCE_ZERO), ctx.slots(node.input[0], info.axis),
            ctx.new_slots(after, SOURCE_ZERO)]))
        return None

    def rewrite(self, node, rw):
        x, out = node.input[0], node.output[0]
        keep = rw.keep(out)
        if keep is None:
            return
        pads, axes = self._pads(node, rw, rw.rank(x))
        if rw.axis(x) not in axes:
            return
        k = axes.index(rw.axis(x))
        before = pads[k]
        pads[k] = int((keep < before).sum())
        pads[k + len(axes)] = int((keep >= before + rw.size(x)).sum())
        if len(node.input) > 1 and node.input[1]:
            rw.set_const(node, 1, np.asarray(pads, dtype=np.int64))
        else:
            set_attr(node, "pads", pads)


SYMBOLIC_BATCH = 1_000_003  # a large prime standing in for a symbolic batch dimension


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


@register("Flatten")
class Flatten(_Relayout):
    def out_dims(self, node, ctx, in_dims):
        k = norm_axis(int(attr(node, "axis", 1)), len(in_dims))
        return [math.prod(in_dims[:k]), math.prod(in_dims[k:])]


@register("Reshape")
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


@register("Transpose")
class Transpose(Rule):
    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        rank = ctx.rank(node.input[0])
        perm = list(attr(node, "perm", list(range(rank - 1, -1, -1)) if rank else []))
        axis = None if info.axis is None else perm.index(info.axis)
        ctx.set(node.output[0], axis, info.slots, info.opaque_reason)
        return None


@register("Squeeze", "Unsqueeze")
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


@register("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
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


@register("Resize", "Upsample")
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


@register("Shape", "Size")
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
