"""Elementwise ops of one tensor (activations, Identity, Cast, ...): output channel c is
``f(input channel c)``. Each op's channel rule, compensation traits, Gaussian activation model
(:class:`Activation`, used by :mod:`onnx_udfc.moments.gaussian`) and reverse pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.builder import Builder
from onnx_udfc.ops.base import Rule, attr, attrs
from onnx_udfc.ops.registry import ConstLookup, Trait, define
from onnx_udfc.ops.tensor_moments import passed_through


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: ``kind`` in relu, leaky, clip, identity, or a name of
    :data:`SMOOTH`; ``alpha`` for leaky; ``lo, hi`` for clip."""

    kind: str = "relu"
    alpha: float = 0.01
    lo: float = 0.0
    hi: float = 6.0


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr  # imported on use: it adds 0.1 s to every run's start

    return x * ndtr(np.asarray(x, dtype=float))


# Activations without a closed form: their moments come from Gauss-Hermite quadrature.
SMOOTH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": _gelu,
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


class PassThrough(Rule):
    """Output channel c is input channel c."""

    spatial = False

    def analyse(self, node, ctx):
        if not all(ctx.channels(n) is None for n in node.input[1:] if n):
            return f"{node.op_type} with a computed parameter input"
        info = ctx.channels(node.input[0])
        if info is None:
            return f"{node.op_type} input has no channel information"
        if self.spatial and info.axis not in (None, 1):
            return f"{node.op_type} works on the axis that holds the channels"
        ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        for extra in node.output[1:]:
            if extra:
                ctx.set(extra, None, None, f"secondary output of {node.op_type}")
        return None


class CastLike(Rule):
    """Output channels are input 0's; input 1 only lends its element type, so a constant cast
    like an activation (``CastLike(0.0, x)``, dynamo's zero bias) stays a constant."""

    def analyse(self, node, ctx):
        info = ctx.channels(node.input[0])
        if info is not None:
            ctx.set(node.output[0], info.axis, info.slots, info.opaque_reason)
        return None


def _bounds(node: onnx.NodeProto, const: ConstLookup) -> tuple[float, float]:
    """Clip's (min, max): inputs from opset 11 (absent: unbounded), attributes before."""
    if len(node.input) >= 3:
        lo = const(node.input[1]) if node.input[1] else None
        hi = const(node.input[2]) if node.input[2] else None
        return (-np.inf if lo is None else float(lo)), (np.inf if hi is None else float(hi))
    return float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))


def _clip_activation(node: onnx.NodeProto, const: ConstLookup) -> Activation:
    lo, hi = _bounds(node, const)
    return Activation("clip", lo=lo, hi=hi)


def _clip_homogeneous(node: onnx.NodeProto, const: ConstLookup) -> bool:
    lo = const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min")
    hi = const(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "max")
    lo = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    # ReLU (0, inf) or identity; opset < 11 spells "no bound" as +-FLT_MAX.
    return (lo == 0.0 or lo <= -1e30) and hi >= 1e30


def _zero(b: Builder) -> str:
    return b.const(np.asarray(0, np.float32))


def _relu_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict):
    x = node.input[0]
    return {x: b.op("Where", [b.op("Greater", [x, _zero(b)]), dy, _zero(b)])}


def _leaky_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict):
    x = node.input[0]
    alpha = b.const(np.asarray(attrs(node).get("alpha", 0.01), np.float32))
    return {x: b.op("Where", [b.op("Greater", [x, _zero(b)]), dy, b.op("Mul", [dy, alpha])])}


def _clip_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict):
    a, ins, x = attrs(node), node.input, node.input[0]
    lo = a.get("min") if len(ins) < 2 or not ins[1] else (
        float(numpy_helper.to_array(inits[ins[1]])) if ins[1] in inits else None)
    hi = a.get("max") if len(ins) < 3 or not ins[2] else (
        float(numpy_helper.to_array(inits[ins[2]])) if ins[2] in inits else None)
    keep = None
    for bound, cmp in ((lo, "Greater"), (hi, "Less")):
        if bound is None:
            continue
        c = b.op(cmp, [x, b.const(np.asarray(bound, np.float32))])
        keep = c if keep is None else b.op("And", [keep, c])
    if keep is None:
        return {x: dy}
    return {x: b.op("Where", [keep, dy, _zero(b)])}


def _sigmoid_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict):
    s = node.output[0]
    one_minus = b.op("Sub", [b.const(np.asarray(1, np.float32)), s])
    return {node.input[0]: b.op("Mul", [dy, b.op("Mul", [s, one_minus])])}


def _identity_grad(b: Builder, node: onnx.NodeProto, dy: str, shapes: dict, inits: dict):
    return {node.input[0]: dy}


def _kind(kind: str) -> Callable[[onnx.NodeProto, ConstLookup], Activation]:
    return lambda node, const: Activation(kind)


PASS = PassThrough()
ACTIVATION = Trait.UNARY | Trait.TRANSPARENT
TAIL = ACTIVATION | Trait.LAYER_TAIL

define("Relu", rule=PASS, traits=TAIL | Trait.HOMOGENEOUS, activation=_kind("relu"),
       backward=_relu_grad)
define("LeakyRelu", rule=PASS, traits=TAIL | Trait.HOMOGENEOUS, backward=_leaky_grad,
       activation=lambda node, const: Activation("leaky",
                                                 alpha=float(attr(node, "alpha", 0.01))))
define("Clip", rule=PASS, traits=TAIL, homogeneous_if=_clip_homogeneous,
       activation=_clip_activation, backward=_clip_grad)
define("HardSwish", rule=PASS, traits=TAIL, activation=_kind("hardswish"))
define("Gelu", rule=PASS, traits=TAIL, activation=_kind("gelu"))
define("Sigmoid", rule=PASS, traits=TAIL | Trait.SATURATING, activation=_kind("sigmoid"),
       backward=_sigmoid_grad)
define("Tanh", rule=PASS, traits=TAIL | Trait.SATURATING, activation=_kind("tanh"))
define("Identity", "Dropout", rule=PASS, traits=TAIL | Trait.HOMOGENEOUS,
       propagate=passed_through, backward=_identity_grad)
define("Neg", "Abs", rule=PASS, traits=ACTIVATION | Trait.HOMOGENEOUS)
# Curved but ReLU-like: a correction crosses them as an approximation.
define("Elu", "Selu", "Softplus", "Mish", "Celu", "ThresholdedRelu", rule=PASS, traits=ACTIVATION)
# Tests of each value: channels stay apart.
define("IsNaN", "IsInf", "Not", rule=PASS, traits=ACTIVATION)
define("HardSigmoid", "Softsign", "Erf", "Sin", "Cos", "Exp", "Log", "Reciprocal", "Sqrt",
       "Sign", "Round", "Floor", "Ceil", rule=PASS, traits=ACTIVATION | Trait.SATURATING)
# A cast keeps each channel apart (it only rounds the values), so a correction crosses it.
define("Cast", rule=PASS, traits=ACTIVATION)
define("CastLike", rule=CastLike(), traits=ACTIVATION)
