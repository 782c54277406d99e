"""Where a producer's channels are read for their moments: after its BN/activation chain."""

from __future__ import annotations

import onnx

from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.ops.registry import Trait, op_spec


def activation_tensor(node: onnx.NodeProto, ctx: ChannelAnalysis) -> str:
    """The last tensor of the BN/activation chain after ``node`` (same channels)."""
    t = node.output[0]
    while True:
        readers = ctx.consumers.get(t, [])
        if len(readers) != 1 or Trait.LAYER_TAIL not in op_spec(readers[0].op_type).traits \
                or readers[0].input[0] != t:
            return t
        t = readers[0].output[0]


def pruning_moments(ctx: ChannelAnalysis, source: MomentSource,
                    stage: str) -> dict[str, TensorMoments]:
    """Moments of every producer's activation output (before any change to the model)."""
    names = [activation_tensor(p.node, ctx) for p in ctx.producers]
    return source.moments(ctx.model, ctx.shapes, names, stage=stage)
