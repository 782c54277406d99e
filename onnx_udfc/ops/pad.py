"""Pad of the channel axis: padded channels are zero sources (ResNet "option A" shortcuts).
Channel rule, traits, moments and reverse pass."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import SOURCE_ZERO, Rule, attr, attrs, input_or_attr, norm_axis, set_attr
from onnx_udfc.ops.registry import ConstLookup, Trait, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments


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


def _pad_moments(step: MomentStep) -> TensorMoments | None:
    """Padded channels are constant (zero variance)."""
    node, rank, x = step.node, step.rank, step.x
    c = x.mean.size
    mode = attr(node, "mode", b"constant")
    pads = step.ints(1, "pads")
    if pads is None or rank is None or len(pads) != 2 * rank:
        return None
    before, after = pads[1], pads[1 + rank]
    if before == 0 and after == 0:
        return step.with_hw(x)
    if mode not in (b"constant", "constant") or before < 0 or after < 0:
        return None
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        v = step.const(node.input[2])
        if v is None:
            return None
        value = float(v.reshape(-1)[0])
    elif attr(node, "value") is not None:
        value = float(attr(node, "value"))
    n = before + c + after
    mean = np.full(n, value)
    mean[before:before + c] = x.mean
    if x.diagonal:
        cov = np.zeros(n)
        cov[before:before + c] = x.cov
    else:
        cov = np.zeros((n, n))
        cov[before:before + c, before:before + c] = x.cov
    return step.with_hw(TensorMoments(mean, cov, x.hw))


def _pad_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
              ) -> dict[str, str] | None:
    """The slice of ``dy`` that the input filled."""
    a, ins, x = attrs(node), node.input, node.input[0]
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


def _pad_homogeneous(node: onnx.NodeProto, const: ConstLookup) -> bool:
    """Padding with zeros (or by reflection) keeps ``f(s z) = s f(z)``."""
    mode = attr(node, "mode", b"constant")
    value = const(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "value")
    return (mode.decode() if isinstance(mode, bytes) else mode) != "constant" or \
        value is None or not np.any(np.asarray(value))


define("Pad", rule=Pad(), traits=Trait.TRANSPARENT, homogeneous_if=_pad_homogeneous,
       propagate=_pad_moments, backward=_pad_grad)
