"""The index-map ops: Concat, Split, Slice and Gather on the channel axis (offsets and
explicit indices; Pad is in :mod:`onnx_udfc.ops.pad`). Channel rules, traits, moments and reverse
passes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import Rule, attr, attrs, input_or_attr, norm_axis, set_attr
from onnx_udfc.ops.elementwise import Elementwise
from onnx_udfc.ops.registry import SEPARATE, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments

INT64_MAX = np.iinfo(np.int64).max


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




# -- moments: index maps on the channel axis, pass-through elsewhere --------------------------
def _take(x: TensorMoments, idx: np.ndarray) -> TensorMoments:
    cov = x.cov[idx] if x.diagonal else x.cov[np.ix_(idx, idx)]
    return TensorMoments(x.mean[idx], cov, x.hw)


def _concat_moments(step: MomentStep) -> TensorMoments | None:
    """Independent inputs: a block-diagonal covariance."""
    rank, x = step.rank, step.x
    axis = int(attr(step.node, "axis", 1))
    if rank is None or axis % rank != 1:
        return None
    parts = [step.moments.get(n) for n in step.node.input]
    if any(p is None for p in parts):
        return None
    mean = np.concatenate([p.mean for p in parts])
    if all(p.diagonal for p in parts):
        return TensorMoments(mean, np.concatenate([p.cov for p in parts]), x.hw)
    cov = np.zeros((mean.size, mean.size))
    i = 0
    for p in parts:
        cov[i:i + p.mean.size, i:i + p.mean.size] = p.full
        i += p.mean.size
    return TensorMoments(mean, cov, x.hw)


def _gather_moments(step: MomentStep) -> TensorMoments | None:
    rank, x = step.rank, step.x
    axis = int(attr(step.node, "axis", 0))
    idx = step.const(step.node.input[1])
    if rank is None or axis % rank == 0:
        return None
    if axis % rank != 1:
        return step.with_hw(x)
    if idx is None or idx.ndim != 1:
        return None
    return _take(x, np.mod(idx.astype(np.int64), x.mean.size))


def _slice_moments(step: MomentStep) -> TensorMoments | None:
    rank, x = step.rank, step.x
    c = x.mean.size
    starts, ends = step.ints(1, "starts"), step.ints(2, "ends")
    if starts is None or ends is None or rank is None:
        return None
    axes = step.ints(3, "axes") or list(range(len(starts)))
    steps = step.ints(4, "steps") or [1] * len(starts)
    idx = np.arange(c)
    for a, b, e, st in zip(axes, starts, ends, steps, strict=False):
        if a % rank == 0:
            return None
        if a % rank == 1:
            idx = idx[slice(b, e, st)]
    return step.with_hw(_take(x, idx) if idx.size != c or np.any(idx != np.arange(c)) else x)


# -- reverse passes: the transposes of the index maps ----------------------------------------
def _slice_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                ) -> dict[str, str] | None:
    """``dy`` scattered into zeros where the slice read."""
    x = node.input[0]
    if x not in shapes or b.opset < 11:
        return None
    shape = shapes[x]
    if any(n and n not in inits for n in node.input[1:]) or len(node.input) < 3:
        return None
    args = [numpy_helper.to_array(inits[n]) if n else None for n in node.input[1:]]
    starts, ends = args[0], args[1]
    axes = args[2] if len(args) > 2 and args[2] is not None else np.arange(len(starts))
    steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(len(starts), np.int64)
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    sl = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        sl[int(a) % len(shape)] = slice(int(s), int(max(min(e, 1 << 62), -(1 << 62))), int(st))
    picked = index[tuple(sl)].reshape(-1)
    zeros = b.const(np.zeros(index.size, np.float32), "zeros")
    flat = b.op("Reshape", [dy, b.const(np.asarray([-1], np.int64))])
    scattered = b.op("ScatterElements", [zeros, b.const(picked, "idx"), flat], axis=0)
    return {x: b.op("Reshape", [scattered, b.const(np.asarray(shape, np.int64))])}


def _concat_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                 ) -> dict[str, str] | None:
    """Each input's part of ``dy``."""
    axis = attrs(node).get("axis", 0)
    out: dict[str, str] = {}
    offset = 0
    for n in node.input:
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


define("Concat", rule=Concat(), traits=SEPARATE, propagate=_concat_moments,
       backward=_concat_grad)
define("Split", rule=Split(), traits=SEPARATE)
define("Slice", rule=Slice(), traits=SEPARATE, propagate=_slice_moments, backward=_slice_grad)
define("Gather", rule=Gather(), traits=SEPARATE, propagate=_gather_moments)
