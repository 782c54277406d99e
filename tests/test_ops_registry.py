"""The op registry: one spec per op type, read by analysis, compensation, moments and cost."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc.channels.absorbers import absorbers
from onnx_udfc.channels.analysis import analyse
from onnx_udfc.moments.gaussian import gaussian_moments
from onnx_udfc.moments.propagated import propagate
from onnx_udfc.ops import OPS, Trait, WeightLayer, define, op_spec, registry
from onnx_udfc.ops.activations import Activation, PassThrough
from onnx_udfc.ops.cost import layer_stats


def test_every_registered_op_has_a_channel_rule():
    missing = [op for op, spec in OPS.items() if spec.rule is None]
    assert not missing
    assert len(OPS) > 90


def test_an_unknown_op_has_an_empty_spec():
    spec = op_spec("NoSuchOp")
    assert spec.rule is None and spec.traits == Trait.NONE and spec.layer is None
    assert spec.activation is None and spec.propagate is None and spec.backward is None


@pytest.mark.parametrize("op, present, absent", [
    ("Relu", Trait.UNARY | Trait.TRANSPARENT | Trait.HOMOGENEOUS | Trait.LAYER_TAIL,
     Trait.SATURATING),
    ("LeakyRelu", Trait.HOMOGENEOUS | Trait.LAYER_TAIL, Trait.SATURATING),
    ("Sigmoid", Trait.SATURATING | Trait.LAYER_TAIL, Trait.HOMOGENEOUS),
    ("Tanh", Trait.SATURATING, Trait.HOMOGENEOUS),
    ("Gelu", Trait.TRANSPARENT | Trait.LAYER_TAIL, Trait.HOMOGENEOUS | Trait.SATURATING),
    ("MaxPool", Trait.TRANSPARENT | Trait.HOMOGENEOUS, Trait.UNARY),
    ("Flatten", Trait.TRANSPARENT | Trait.HOMOGENEOUS, Trait.UNARY),
    ("Add", Trait.BINARY, Trait.TRANSPARENT),
    ("BatchNormalization", Trait.LAYER_TAIL, Trait.TRANSPARENT),
    ("Conv", Trait.NONE, Trait.TRANSPARENT | Trait.HOMOGENEOUS),
])
def test_traits_of_known_ops(op, present, absent):
    traits = op_spec(op).traits
    assert present in traits
    assert not traits & absent


def _const(values: dict[str, np.ndarray]):
    return lambda name: values.get(name)


@pytest.mark.parametrize("bounds, homogeneous", [
    ((0.0, None), True),  # ReLU
    ((None, None), True),  # identity
    ((0.0, 6.0), False),  # ReLU6
    ((-1.0, None), False),
])
def test_clip_homogeneity_depends_on_its_bounds(bounds, homogeneous):
    values = {n: np.asarray(v) for n, v in zip(("lo", "hi"), bounds, strict=True)
              if v is not None}
    node = helper.make_node("Clip", ["x", "lo" if "lo" in values else "",
                                     "hi" if "hi" in values else ""], ["y"])
    assert op_spec("Clip").homogeneous(node, _const(values)) is homogeneous


def test_activation_models_read_the_node():
    leaky = helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.25)
    assert op_spec("LeakyRelu").activation(leaky, _const({})) == Activation("leaky", alpha=0.25)
    clip = helper.make_node("Clip", ["x", "lo", "hi"], ["y"])
    got = op_spec("Clip").activation(clip, _const({"lo": np.asarray(0.0),
                                                   "hi": np.asarray(6.0)}))
    assert got == Activation("clip", lo=0.0, hi=6.0)
    assert op_spec("Sigmoid").activation(helper.make_node("Sigmoid", ["x"], ["y"]),
                                         _const({})) == Activation("sigmoid")


def test_conv_and_conv_transpose_share_their_base():
    conv, convt = type(op_spec("Conv").rule), type(op_spec("ConvTranspose").rule)
    base = conv.__mro__[1]
    assert base is convt.__mro__[1] and issubclass(base, WeightLayer)
    own = {k for cls in (conv, convt) for k in vars(cls) if not k.startswith("__")}
    assert own == {"out_axis"}
    plain = helper.make_node("Conv", ["x", "w"], ["y"])
    assert op_spec("Conv").layer.layout(plain, {}) == (0, 1)
    assert op_spec("ConvTranspose").layer.layout(plain, {}) == (1, 0)
    assert op_spec("Conv").layer.channels(plain, [8, 3, 3, 3]) == (3, 8)
    assert op_spec("ConvTranspose").layer.channels(plain, [8, 3, 3, 3]) == (8, 3)


def test_weight_layers_are_the_ones_with_a_layout():
    layers = sorted(op for op, spec in OPS.items() if spec.layer is not None)
    assert layers == ["Conv", "ConvTranspose", "Gemm", "MatMul"]


# -- a toy op, registered with the one public call ------------------------------------------
def _toy_model() -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("ToyOp", ["c1"], ["t"], name="toy"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shapes = {"x": [1, 3, 8, 8], "c1": [1, 8, 8, 8], "t": [1, 8, 8, 8], "y": [1, 4, 8, 8]}
    return model, shapes


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by the test are dropped afterwards."""
    monkeypatch.setattr(registry, "OPS", dict(registry.OPS))


def test_an_unregistered_op_stops_the_analysis(scratch_registry):
    model, shapes = _toy_model()
    ctx = analyse(model, shapes)
    assert ("toy", "unsupported op ToyOp") in ctx.unsupported
    assert "t" not in propagate(model, shapes)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_a_registered_toy_op_is_used_everywhere(scratch_registry, homogeneous):
    traits = Trait.UNARY | Trait.TRANSPARENT | (Trait.HOMOGENEOUS if homogeneous else Trait.NONE)
    define("ToyOp", rule=PassThrough(), traits=traits,
           activation=lambda node, const: Activation("relu"))
    model, shapes = _toy_model()
    ctx = analyse(model, shapes)
    assert not ctx.unsupported
    assert np.array_equal(ctx.tensors["t"].slots, ctx.tensors["c1"].slots)

    found, reason = absorbers(model.graph.node[0], ctx, cross_channel=True)
    assert reason is None
    assert [a.layer.node.name for a in found] == ["conv2"]
    assert found[0].nonlinear == (() if homogeneous else ("ToyOp",))

    moments = propagate(model, shapes)
    mean, cov = gaussian_moments(moments["c1"].mean, moments["c1"].cov, Activation("relu"))
    assert np.allclose(moments["t"].mean, mean) and np.allclose(moments["t"].cov, cov)
    assert [s.name for s in layer_stats(model, shapes)] == ["conv1", "conv2"]
