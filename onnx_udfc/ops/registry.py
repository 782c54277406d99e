"""The op registry: one :class:`OpSpec` per ONNX op type, holding everything the package knows
about it (see the package doc, "Adding an op"). :func:`define` is the one call that adds or
replaces an op; every other module asks :func:`op_spec`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_udfc.ops.base import IntegerLayer, Rule, WeightLayer

if TYPE_CHECKING:
    from onnx_udfc.core.builder import Builder
    from onnx_udfc.ops.activations import Activation
    from onnx_udfc.ops.tensor_moments import MomentStep, TensorMoments


class Trait(enum.Flag):
    """What compensation and udfc+ need to know about an op's effect on a channel."""

    NONE = 0
    # Elementwise in one tensor: output channel c is f(input channel c).
    UNARY = enum.auto()
    # Keeps the channels apart: a compensation may cross it to the weight layers behind.
    TRANSPARENT = enum.auto()
    # f(s z) = s f(z) for s > 0: a correction of z crosses it exactly.
    HOMOGENEOUS = enum.auto()
    # Bounded or offset (f(0) != 0, or saturating both ways): a linear combination of its
    # outputs cannot stand for another channel's, nor a rescaling for a rescaled input.
    SATURATING = enum.auto()
    # Elementwise of two operands: with channel-uniform constants or the channel itself it
    # builds an activation (x * sigmoid(x) = SiLU, 0.5 x (1 + erf(x / sqrt 2)) = GELU, ...).
    BINARY = enum.auto()
    # BatchNorm or activation whose output udfc+ reconstructs as part of the layer in front.
    LAYER_TAIL = enum.auto()


# Channel-separate and linear in each channel: layout ops, pooling, index maps.
SEPARATE = Trait.TRANSPARENT | Trait.HOMOGENEOUS

ConstLookup = Callable[[str], "np.ndarray | None"]
# Whether the node is positively homogeneous, when that depends on its constants (Clip bounds).
HomogeneityTest = Callable[[onnx.NodeProto, ConstLookup], bool]
# The node's elementwise function for the Gaussian moment model.
ActivationRule = Callable[[onnx.NodeProto, ConstLookup], "Activation"]
# Moments of the node's first output, or None when the model cannot follow it.
MomentRule = Callable[["MomentStep"], "TensorMoments | None"]
# (builder, node, gradient at output 0, shapes, initializers) -> gradient per input, or None.
GradientRule = Callable[["Builder", onnx.NodeProto, str, dict, dict], "dict[str, str] | None"]


@dataclass(frozen=True)
class OpSpec:
    """Everything known about one op type; an absent part means "not supported there"."""

    rule: Rule | None = None  # channel analysis and rewrite
    traits: Trait = Trait.NONE
    homogeneous_if: HomogeneityTest | None = None  # overrides Trait.HOMOGENEOUS
    activation: ActivationRule | None = None  # moments through the Gaussian model
    propagate: MomentRule | None = None  # moments of any other op
    backward: GradientRule | None = None  # the reverse pass of model inversion

    @property
    def layer(self) -> WeightLayer | None:
        """The weight layout, for a layer with a constant weight."""
        return self.rule if isinstance(self.rule, WeightLayer) else None

    @property
    def integer(self) -> IntegerLayer | None:
        """The float layer an integer op computes, for an op of an already-quantized model."""
        return self.rule if isinstance(self.rule, IntegerLayer) else None

    def homogeneous(self, node: onnx.NodeProto, const: ConstLookup) -> bool:
        """Whether ``f(s z) = s f(z)`` (s > 0) holds for this node."""
        if self.homogeneous_if is not None:
            return self.homogeneous_if(node, const)
        return Trait.HOMOGENEOUS in self.traits


OPS: dict[str, OpSpec] = {}
_UNKNOWN = OpSpec()


def define(*op_types: str, rule: Rule | None = None, traits: Trait = Trait.NONE,
           homogeneous_if: HomogeneityTest | None = None,
           activation: ActivationRule | None = None, propagate: MomentRule | None = None,
           backward: GradientRule | None = None) -> None:
    """Register (or replace) the spec of each of ``op_types``."""
    spec = OpSpec(rule, traits, homogeneous_if, activation, propagate, backward)
    for op in op_types:
        OPS[op] = spec


def op_spec(op_type: str) -> OpSpec:
    """The spec of ``op_type``; an empty one (no rule, no traits) for an unknown op."""
    return OPS.get(op_type, _UNKNOWN)
