"""Channel rules of the index-map ops: Concat, Split, Slice and Gather on the channel axis
(offsets and explicit indices) and Pad of the channel axis (zero sources)."""

from __future__ import annotations

import numpy as np

from onnx_udfc.ops.base import (
    SOURCE_ZERO,
    Elementwise,
    Rule,
    attr,
    input_or_attr,
    norm_axis,
    register,
    set_attr,
)

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
