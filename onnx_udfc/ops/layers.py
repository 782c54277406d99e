"""Channel rules of the layers that own weights: Conv, ConvTranspose, Gemm, MatMul.

These are the *producers* (their output channels are fresh slots, one filter each) and the
*consumers* (removing an input channel drops a slice of their weight, which is what absorbs a
pruned channel).
"""

from __future__ import annotations

import numpy as np

from onnx_udfc.ops.base import Rule, attr, register, set_attr


def _bias_rewrite(node, rw, index: int, keep_out: np.ndarray | None) -> None:
    if keep_out is not None and len(node.input) > index and node.input[index]:
        bias = rw.const(node.input[index])
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == rw.size(node.output[0]) \
                and bias.shape[-1] > 1:
            rw.set_const(node, index, np.take(bias, keep_out, axis=-1))


def fix_computed_bias(node, ctx, index: int, out: np.ndarray) -> None:
    """A bias computed at run time (the dynamo exporter's ``Expand(CastLike(0, x), [N])``
    when nothing folded it) cannot be cut: the output channels it covers stay."""
    name = node.input[index] if len(node.input) > index else ""
    if not name or ctx.const(name) is not None:
        return
    shape = ctx.shape(name)
    if shape is not None and len(shape) and shape[-1] == 1:
        return  # broadcast along the channels
    ctx.fix(out, f"{node.op_type} bias '{name}' is computed at run time")


@register("Conv")
class Conv(Rule):
    """Conv: plain (producer + consumer), depthwise (input channel c feeds output channels
    c*m..c*m+m-1, so they are one class) or grouped (the same number of channels must go from
    every group, on both sides)."""

    def analyse(self, node, ctx):
        w = ctx.const(node.input[1])
        if w is None:
            return "Conv with a computed weight"
        groups = int(attr(node, "group", 1))
        cout, cin = w.shape[0], w.shape[1] * groups
        xs = ctx.slots(node.input[0], 1)
        if len(xs) != cin:
            return f"Conv expects {cin} input channels, the graph gives {len(xs)}"
        if groups == 1:
            ctx.produce(node, node.output[0], 1, w.reshape(cout, -1))
        elif groups == cin:
            ctx.set(node.output[0], 1, np.repeat(xs, cout // cin))
        else:
            ctx.balance.append((xs, groups))
            out = ctx.produce(node, node.output[0], 1, w.reshape(cout, -1))
            ctx.balance.append((out, groups))
        fix_computed_bias(node, ctx, 2, ctx.tensors[node.output[0]].slots)
        return None

    def rewrite(self, node, rw):
        keep_in, keep_out = rw.keep(node.input[0]), rw.keep(node.output[0])
        if keep_in is None and keep_out is None:
            return
        w = rw.const(node.input[1])
        groups = int(attr(node, "group", 1))
        cin = w.shape[1] * groups
        if keep_out is not None:
            w = w[keep_out]
        if groups == 1:
            if keep_in is not None:
                w = w[:, keep_in]
        elif groups == cin:
            if keep_in is not None:
                set_attr(node, "group", len(keep_in))
        elif keep_in is not None:
            per_in = cin // groups
            per_out = w.shape[0] // groups
            parts = []
            for g in range(groups):
                rel = keep_in[(keep_in >= g * per_in) & (keep_in < (g + 1) * per_in)] - g * per_in
                parts.append(w[g * per_out:(g + 1) * per_out][:, rel])
            w = np.concatenate(parts, axis=0)
        rw.set_const(node, 1, w)
        _bias_rewrite(node, rw, 2, keep_out)


@register("ConvTranspose")
class ConvTranspose(Rule):
    """ConvTranspose: weight [Cin, Cout/group, k...]; plain or depthwise."""

    def analyse(self, node, ctx):
        w = ctx.const(node.input[1])
        if w is None:
            return "ConvTranspose with a computed weight"
        groups = int(attr(node, "group", 1))
        cin, cout = w.shape[0], w.shape[1] * groups
        xs = ctx.slots(node.input[0], 1)
        if len(xs) != cin:
            return f"ConvTranspose expects {cin} input channels, the graph gives {len(xs)}"
        if groups == 1:
            ctx.produce(node, node.output[0], 1, np.swapaxes(w, 0, 1).reshape(cout, -1))
        elif groups == cin:
            ctx.set(node.output[0], 1, np.repeat(xs, cout // cin))
        else:
            return f"grouped ConvTranspose (group={groups})"
        fix_computed_bias(node, ctx, 2, ctx.tensors[node.output[0]].slots)
        return None

    def rewrite(self, node, rw):
        keep_in, keep_out = rw.keep(node.input[0]), rw.keep(node.output[0])
        if keep_in is None and keep_out is None:
            return
        w = rw.const(node.input[1])
        groups = int(attr(node, "group", 1))
        if keep_in is not None:
            w = w[keep_in]
        if groups == 1:
            if keep_out is not None:
                w = w[:, keep_out]
        elif keep_in is not None:
            set_attr(node, "group", len(keep_in))
        rw.set_const(node, 1, w)
        _bias_rewrite(node, rw, 2, keep_out)


@register("Gemm")
class Gemm(Rule):
    """Gemm with a constant B: consumes A's features (axis 1, or 0 with transA) and produces N
    output features; bias C follows the output features."""

    def analyse(self, node, ctx):
        b = ctx.const(node.input[1])
        if b is None:
            return "Gemm with a computed B"
        trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
        k = b.shape[1] if trans_b else b.shape[0]
        xs = ctx.slots(node.input[0], 0 if trans_a else 1)
        if len(xs) != k:
            return f"Gemm expects {k} input features, the graph gives {len(xs)}"
        out = ctx.produce(node, node.output[0], 1, b if trans_b else b.T)
        fix_computed_bias(node, ctx, 2, out)
        return None

    def rewrite(self, node, rw):
        keep_in, keep_out = rw.keep(node.input[0]), rw.keep(node.output[0])
        if keep_in is None and keep_out is None:
            return
        b = rw.const(node.input[1])
        trans_b = int(attr(node, "transB", 0))
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        if keep_in is not None:
            b = np.take(b, keep_in, axis=in_axis)
        if keep_out is not None:
            b = np.take(b, keep_out, axis=out_axis)
        rw.set_const(node, 1, b)
        _bias_rewrite(node, rw, 2, keep_out)


@register("MatMul")
class MatMul(Rule):
    """MatMul by a constant 2-D weight on the right: the Linear of 3-D inputs."""

    def analyse(self, node, ctx):
        b = ctx.const(node.input[1])
        if b is None or ctx.channels(node.input[1]) is not None:
            return "MatMul between two computed tensors"
        if b.ndim != 2:
            return f"MatMul with a {b.ndim}-D constant weight"
        rank = ctx.rank(node.input[0])
        if rank is None or rank < 2:
            return "MatMul input of unknown or vector rank"
        xs = ctx.slots(node.input[0], rank - 1)
        if len(xs) != b.shape[0]:
            return f"MatMul expects {b.shape[0]} input features, the graph gives {len(xs)}"
        ctx.produce(node, node.output[0], rank - 1, b.T)
        return None

    def rewrite(self, node, rw):
        keep_in, keep_out = rw.keep(node.input[0]), rw.keep(node.output[0])
        if keep_in is None and keep_out is None:
            return
        b = rw.const(node.input[1])
        if keep_in is not None:
            b = b[keep_in]
        if keep_out is not None:
            b = b[:, keep_out]
        rw.set_const(node, 1, b)
