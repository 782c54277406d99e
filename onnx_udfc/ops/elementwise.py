"""Broadcasting elementwise ops of several tensors (residual Add, per-channel constants,
comparisons, ...): channel rule, compensation traits, moments and reverse pass."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import Rule
from onnx_udfc.ops.registry import Trait, define
from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments


class Elementwise(Rule):
    """Broadcasting elementwise ops: activations tie their channels index by index (residual
    connections); a constant with a full channel dimension is a per-channel follower."""

    def analyse(self, node, ctx):
        out_rank = ctx.rank(node.output[0])
        acts = [n for n in node.input if ctx.channels(n) is not None]
        # a constant aligns to the output's trailing axes: only known ranks place it
        ranks_known = out_rank is not None or all(ctx.rank(n) is not None for n in acts)
        if out_rank is None:
            out_rank = max(ctx.rank(n) or 0 for n in node.input if n)
        aligned = {ctx.channels(n).axis + out_rank - (ctx.rank(n) or out_rank)
                   for n in acts if ctx.channels(n).axis is not None}
        if not aligned:
            info = ctx.channels(acts[0])
            if len(acts) > 1:
                for n in acts:  # several opaque inputs: nothing to tie, all stay fixed
                    ctx.fix_tensor(n, info.opaque_reason)
            ctx.set(node.output[0], None, None, info.opaque_reason)
            return None
        if len(aligned) > 1:
            return "inputs hold their channels on different axes"
        axis = aligned.pop()
        out_shape = ctx.shape(node.output[0])
        out_size = out_shape[axis] if out_shape is not None else None
        slots = None
        for n in acts:
            rank = ctx.rank(n) or out_rank
            ax = axis - (out_rank - rank)
            shape = ctx.shape(n)
            if ax < 0 or (shape is not None and ax < len(shape) and shape[ax] == 1
                          and out_size != 1):
                continue  # broadcast along the channel axis: not tied
            s = ctx.slots(n, ax)
            if slots is None:
                slots = s
            elif len(s) == len(slots):
                ctx.union(slots, s)
            else:
                return "inputs disagree on the channel count"
        if slots is None:  # every activation broadcasts: the channels come from a constant
            if not isinstance(out_size, int):
                return "cannot tell the output's channel count"
            slots = ctx.new_slots(out_size)
            ctx.fix(slots, "channels created by broadcasting a constant")
        for n in node.input:
            value = ctx.const(n)
            if value is not None and value.ndim > 0 and value.size > 1:
                ax = axis - (out_rank - value.ndim)
                if not ranks_known or ax >= value.ndim:
                    return f"cannot align constant '{n}' with the channel axis (unknown rank)"
                if ax >= 0 and value.shape[ax] not in (1, len(slots)):
                    return f"constant '{n}' does not broadcast per channel"
            elif value is None and n and ctx.channels(n) is None and len(slots) > 1:
                # Computed from constants but not folded (too large, DequantizeLinear, ...):
                # the rewrite could not cut it, so it must broadcast along the channels.
                shape = ctx.shape(n)
                ax = axis - (out_rank - len(shape)) if shape is not None else 0
                if shape is None or (0 <= ax < len(shape) and shape[ax] != 1):
                    return f"per-channel operand '{n}' is computed at run time"
        ctx.set(node.output[0], axis, slots)
        return None

    def rewrite(self, node, rw):
        out = node.output[0]
        keep = rw.keep(out)
        if keep is None:
            return
        axis, out_rank = rw.axis(out), rw.rank(out)
        for i, n in enumerate(node.input):
            value = rw.const(n)
            if value is None or value.ndim == 0:
                continue
            ax = axis - (out_rank - value.ndim)
            if 0 <= ax < value.ndim and value.shape[ax] == rw.size(out) and rw.size(out) > 1:
                rw.set_const(node, i, np.take(value, keep, axis=ax))


def _add_cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == b.ndim:
        return a + b
    return a + np.diag(b) if a.ndim == 2 else np.diag(a) + b


def _add_moments(step: MomentStep) -> TensorMoments | None:
    """Independent branches (a residual Add) sum; a constant shifts the mean."""
    node = step.node
    if len(node.input) != 2:
        return None
    a, b = (step.moments.get(n) for n in node.input)
    if a is not None and b is not None and a.mean.size == b.mean.size:
        return TensorMoments(a.mean + b.mean, _add_cov(a.cov, b.cov), a.hw)
    c = step.const(node.input[1])
    if a is not None and c is not None and c.size in (1, a.mean.size):
        return TensorMoments(a.mean + c.reshape(-1), a.cov, a.hw)
    return None


def _fan_out_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict
                  ) -> dict[str, str] | None:
    """Add, Sub and Mul of same-shaped tensors (or a constant)."""
    t, ins = node.op_type, node.input
    out: dict[str, str] = {}
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


TIES = Elementwise()

define("Add", rule=TIES, traits=Trait.BINARY, propagate=_add_moments, backward=_fan_out_grad)
define("Sub", "Mul", rule=TIES, traits=Trait.BINARY, backward=_fan_out_grad)
define("Div", "Pow", "Max", "Min", rule=TIES, traits=Trait.BINARY)
define("PRelu", rule=TIES, traits=Trait.HOMOGENEOUS)
define("Sum", "Mean", "Where", "BitShift", "And", "Or", "Xor", "Equal", "Less", "Greater",
       "LessOrEqual", "GreaterOrEqual", "Mod", rule=TIES)
