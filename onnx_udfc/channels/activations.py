"""Where a producer's channels are read for their moments: after its BN/activation chain, or,
when udfc+ reconstructs them past a depthwise Conv or a reader's BatchNormalization, after that
layer's own chain. The chain includes activations that exporters write as several elementwise
ops (``x * sigmoid(x)``, ``x * clip(x + 3, 0, 6) / 6``, a learnable ``a * x + b`` after them):
the reconstruction is then fitted to what the next layer reads, not to the activation's
input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnx_udfc.channels.analysis import ChannelAnalysis, Producer
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.ops.registry import Trait, op_spec


def activation_tensor(node: onnx.NodeProto, ctx: ChannelAnalysis,
                      through: Sequence[onnx.NodeProto] = ()) -> str:
    """The last tensor of the BN/activation chain after ``node`` (same channels); with
    ``through`` (the channel-separate layers its channels cross, ``Absorber.crossed``), the
    chain after the last of them: the last channel-separate tensor before the absorbers (after
    a BatchNormalization that reads a Concat it holds other layers' channels too)."""
    t = (through[-1] if through else node).output[0]
    while True:
        readers = ctx.consumers.get(t, [])
        if len(readers) == 1 and Trait.LAYER_TAIL in op_spec(readers[0].op_type).traits \
                and readers[0].input[0] == t:
            t = readers[0].output[0]
            continue
        end = elementwise_pattern_end(ctx, t)
        if end is None:
            return t
        t = end


# An exported activation spans a handful of ops (HardSwish as Add, Clip, Mul, Div); the bound
# keeps the walk local.
PATTERN_NODES = 12


def elementwise_pattern_end(ctx: ChannelAnalysis, start: str) -> str | None:
    """The output of the elementwise function of ``start`` alone (and constants) that its
    readers build, when exactly one tensor of that function is read by anything else (or is a
    graph output) and it holds ``start``'s channels; else None. A reader that mixes ``start``
    with another computed tensor (a residual Add, a squeeze-excite gate) or changes its layout
    leaves ``start`` read outside the pattern, so the walk stops there."""
    inside, taken = {start}, set()
    outputs = {o.name for o in ctx.graph.output}
    grew = True
    while grew and len(taken) < PATTERN_NODES:
        grew = False
        for t in list(inside):
            for c in ctx.consumers.get(t, []):
                if id(c) in taken or not c.output or not _elementwise(c) or \
                        not all(not n or n in inside or ctx.const(n) is not None
                                for n in c.input) or \
                        not same_classes(ctx, start, c.output[0]):
                    continue
                taken.add(id(c))
                inside.add(c.output[0])
                grew = True
    ends = [t for t in inside if t in outputs or
            any(id(c) not in taken for c in ctx.consumers.get(t, []))]
    return ends[0] if len(ends) == 1 and ends[0] != start else None


def _elementwise(node: onnx.NodeProto) -> bool:
    traits = op_spec(node.op_type).traits
    return bool(traits & (Trait.BINARY | Trait.UNARY | Trait.LAYER_TAIL))


def same_classes(ctx: ChannelAnalysis, a: str, b: str) -> bool:
    """Whether tensors ``a`` and ``b`` hold the same channel classes in the same order."""
    x, y = ctx.tensors.get(a), ctx.tensors.get(b)
    if x is None or y is None or x.slots is None or y.slots is None or \
            len(x.slots) != len(y.slots):
        return False
    roots = ctx.roots()
    return bool(np.array_equal(roots[x.slots], roots[y.slots]))


def channel_separate(conv: onnx.NodeProto, tensor: str, origin: str,
                     ctx: ChannelAnalysis) -> str | None:
    """None when the depthwise ``conv`` reading ``tensor`` (``origin``'s channels, all and
    only them, in order) keeps every channel on its own: its output channel j is input channel
    j's (one class, so pruning removes both) and its weight is its own. Else why a
    reconstruction cannot be moved past it."""
    label = f"{conv.op_type} '{conv.name or conv.output[0]}'"
    if sum(list(n.input).count(conv.input[1]) for n in ctx.graph.node) > 1:
        return f"its channels pass through depthwise {label}, whose weight is shared"
    if not same_classes(ctx, origin, tensor) or not same_classes(ctx, tensor, conv.output[0]):
        return f"its channels pass through grouped/depthwise {label}"
    return None


def pruning_moments(ctx: ChannelAnalysis, source: MomentSource, stage: str,
                    removed: np.ndarray | None = None) -> dict[str, TensorMoments]:
    """Moments of every producer's activation output (before any change to the model); with
    ``removed`` (per channel class) only of the producers that lose a channel: the others are
    not rebuilt, and every tensor left out is one covariance less to sum."""
    names = [activation_tensor(p.node, ctx) for p in pruned_producers(ctx, removed)]
    return source.moments(ctx.model, ctx.shapes, names, stage=stage,
                          axes=channel_axes(ctx, names))


def pruned_producers(ctx: ChannelAnalysis, removed: np.ndarray | None) -> list[Producer]:
    """The producers that lose a channel to ``removed`` (per class; all when None)."""
    if removed is None:
        return list(ctx.producers)
    root = ctx.roots()
    return [p for p in ctx.producers if removed[root[p.slots]].any()]


def channel_axes(ctx: ChannelAnalysis, tensors: list[str]) -> dict[str, int]:
    """The channel axis of each of ``tensors`` the analysis placed elsewhere than axis 1."""
    out = {}
    for t in tensors:
        info = ctx.tensors.get(t)
        if info is not None and info.axis is not None and info.axis != 1:
            out[t] = info.axis
    return out
