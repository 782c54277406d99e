"""Everything known about an ONNX op type, one :class:`~onnx_udfc.ops.registry.OpSpec` per op.

Importing the package registers every op. The rest of the package asks
:func:`~onnx_udfc.ops.registry.op_spec` and keeps no table of op types of its own.

Adding an op
------------
Add one :func:`~onnx_udfc.ops.registry.define` call to the module of its family (activations,
elementwise, norms, pooling, layout, index, pad, layers), or to a new module imported below.
Only ``rule`` is needed for pruning; every other part is optional, and an op without it is
simply not followed there:

``rule``
    The channel rule (:class:`~onnx_udfc.ops.base.Rule`): ``analyse`` says where the output
    channels come from, ``rewrite`` cuts the node's constants. Reuse the family's rule when
    the op moves channels like its siblings (``PassThrough`` for an elementwise activation).
    A layer with a constant weight subclasses :class:`~onnx_udfc.ops.base.WeightLayer`, which
    also gives its weight layout (compensation, statistics), its cost and the ``check`` that
    refuses a weight contradicting the op; a sibling with the same layout on other axes
    subclasses the family's base (Conv and ConvTranspose differ only in ``out_axis``). An op
    computing a weight layer on integer codes (QLinearConv, ...) gets an
    :class:`~onnx_udfc.ops.base.IntegerLayer`: the model is refused as already quantized and
    costed as the float layer.
``traits``
    :class:`~onnx_udfc.ops.registry.Trait` flags for compensation and udfc+: ``TRANSPARENT``
    (a correction may cross it), ``UNARY``, ``HOMOGENEOUS`` (or ``homogeneous_if`` when it
    depends on constants, like Clip's bounds), ``SATURATING``, ``BINARY``, ``LAYER_TAIL``.
``activation``
    For an elementwise activation: ``(node, const) -> Activation`` for the Gaussian moment
    model. A new smooth function goes into :data:`~onnx_udfc.ops.activations.SMOOTH`.
``propagate``
    For any other op the moment propagation follows: ``MomentStep -> TensorMoments | None``
    (:mod:`onnx_udfc.ops.tensor_moments`).
``backward``
    The reverse pass for model inversion: ``(builder, node, dy, shapes, inits)`` -> the
    gradient name per input, appended with :class:`~onnx_udfc.core.builder.Builder`.

Then add a case to the op's family tests (tests/test_rules.py for the channel rule) and to
tests/test_ops_registry.py for its traits.
"""

from onnx_udfc.ops import (  # noqa: F401  (each module defines its ops)
    activations,
    elementwise,
    index,
    layers,
    layout,
    norms,
    pad,
    pooling,
)
from onnx_udfc.ops.base import Rule, WeightLayer
from onnx_udfc.ops.registry import OPS, OpSpec, Trait, define, op_spec

__all__ = ["OPS", "OpSpec", "Rule", "Trait", "WeightLayer", "define", "op_spec"]
