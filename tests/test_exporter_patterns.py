"""Engine fixes found on the coverage zoo, each on the smallest graph that shows it: shapes that
exporters compute at run time, old-IR models, computed biases and operands, and compensation
through linear-layer biases and non-ReLU activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.channels import absorbers as compensate
from onnx_udfc.channels.stats import layer_stats, weight_layer
from onnx_udfc.core.normalize import fold_constants
from tests.helpers import (
    BATCH,
    Builder,
    analysed,
    compensations,
    image,
    initializers,
    max_diff,
    quantizations,
    random_feeds,
    run,
)


def group_sizes(model: onnx.ModelProto) -> list[tuple[int, int]]:
    return [(g.size, g.prunable) for g in analysed(model).groups]


# -- run-time shape arithmetic (legacy exports with a dynamic batch) ------------------------------
def dim(b: Builder, x: str, i: int) -> str:
    """``x.size(i)`` as the legacy exporter writes it: Shape -> Gather -> Unsqueeze."""
    g = b.op("Gather", [b.op("Shape", [x]), b.ints(i)], axis=0)
    return b.op("Unsqueeze", [g, b.ints([0])])


def legacy_shuffle_and_chunk(zero=False):
    """conv -> view(N, 2, C/2, H, W) -> transpose -> view(N, -1, H, W) -> chunk(2) -> convs,
    every size read at run time like ``x.size()`` under a dynamic batch."""
    b = Builder(seed=31)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    half = b.op("Cast", [b.op("Div", [b.op("Gather", [b.op("Shape", [h]), b.ints(1)], axis=0),
                                      b.ints(2)])], to=TensorProto.INT64)
    half = b.op("Unsqueeze", [half, b.ints([0])])
    t1 = b.op("Concat", [dim(b, h, 0), b.ints([2]), half, dim(b, h, 2), dim(b, h, 3)], axis=0)
    s = b.op("Transpose", [b.op("Reshape", [h, t1])], perm=[0, 2, 1, 3, 4])
    t2 = b.op("Concat", [dim(b, h, 0), b.ints([-1]), dim(b, h, 2), dim(b, h, 3)], axis=0)
    y = b.op("Reshape", [s, t2], "shuffled")
    c = b.op("Gather", [b.op("Shape", [y]), b.ints(1)], axis=0)
    mid = b.op("Unsqueeze", [b.op("Div", [c, b.ints(2)]), b.ints([0])])
    left = b.op("Slice", [y, b.ints([0]), mid, b.ints([1])], "left")
    right = b.op("Slice", [y, mid, b.op("Unsqueeze", [c, b.ints([0])]), b.ints([1])], "right")
    r = b.relu(b.conv(right, 4, 6, name="conv1"), "r1")
    out = b.op("Concat", [left, b.conv(r, 6, 4, name="conv2")], "cat", axis=1)
    flat = b.op("Reshape", [out, b.op("Concat", [dim(b, out, 0), b.ints([-1])], axis=0)])
    b.output(b.gemm(flat, 8 * 64, 5, name="fc", trans_b=1))
    return b.build()


def test_run_time_shapes_fold_and_channels_stay_prunable():
    model = legacy_shuffle_and_chunk()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    api.normalize(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Shape" not in ops and "Gather" not in ops  # every static read folded
    targets = [numpy_helper.to_array(t).tolist() for t in m.graph.initializer
               if t.name.endswith("_shape")]
    assert sorted(targets) == [[0, 2, 4, 8, 8], [0, 8, 8, 8], [0, 512]]  # batch copied
    a = api.analyse(m)
    by = {p: g for g in a.groups for p in g.producers}
    assert by["conv1"].prunable == 6  # between the chunk and the concat
    assert by["conv0"].prunable == 0  # through the shuffle
    assert by["conv2"].prunable == 4  # concatenated after the shuffled half, into the Gemm
    for ratio in (0.0, 0.5):
        out, rep = api.compress(model, prune=ratio, target="fake", method="prune")
        assert max_diff(model, out) < 1e-5 if ratio == 0 else rep.macs_after < rep.macs_before
        assert [o.shape for o in run(out, random_feeds(model))] == [(2, 5)]


def test_dynamo_reshape_with_allowzero_and_symbolic_batch():
    b = Builder(seed=32)
    x = image(b)
    h = b.relu(b.conv(x, 3, 8, name="conv0"), "r0")
    p = b.op("GlobalAveragePool", [h])
    n = b.op("Squeeze", [b.op("Shape", [x], start=0, end=1), b.ints([0])])
    target = b.op("Concat", [b.op("Reshape", [n, b.ints([1])]), b.ints([-1])], axis=0)
    b.output(b.gemm(b.op("Reshape", [p, target], allowzero=1), 8, 5, name="fc", trans_b=1))
    model = b.build()
    assert group_sizes(model)[0] == (8, 8)
    out, rep = api.compress(model, prune=0.5, target="fake", method="prune")
    assert rep.macs_after < rep.macs_before


def test_static_channel_count_read_is_folded_not_fixed():
    """Was fixed by the Shape rule; now the read becomes the constant it always was."""
    b = Builder(seed=33)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    c = b.op("Gather", [b.op("Shape", [h]), b.ints([1])], axis=0)
    b.output(b.conv(h, 8, 4, name="conv1"),
             b.op("Reshape", [b.input("y", [BATCH, 16]), b.op("Concat", [b.ints([-1]), c],
                                                                 axis=0)]))
    model = b.build()
    assert group_sizes(model)[0] == (8, 8)
    out, _ = api.compress(model, prune=0.5, target="fake", method="prune")
    feeds = random_feeds(model)
    assert run(out, feeds)[1].shape == run(model, feeds)[1].shape == (4, 8)


# -- old IR / old opsets ---------------------------------------------------------------------------
def test_ir3_initializers_declared_as_inputs():
    """IR 3 lists every initializer among the graph inputs: their declared shapes must follow
    the pruning, and initializers added on the way must be declared too."""
    b = Builder(opset=9, seed=34)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    h = b.op("Slice", [h], "sl", starts=[0], ends=[6], axes=[1])  # becomes a Gather + indices
    b.output(b.conv(h, 6, 4, name="conv1"))
    model = b.build()
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    out, rep = api.compress(model, prune=0.5,
        target="fake", method="prune")  # the full checker runs inside
    assert rep.macs_after < rep.macs_before
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in out.graph.input}
    assert all(declared[t.name] == list(t.dims) for t in out.graph.initializer)
    assert run(out, random_feeds(model))[0].shape == (2, 4, 8, 8)


def test_constant_folding_uses_the_models_opset():
    """Unsqueeze-1 (axes attribute) and Clip-6 (min/max attributes) must fold with their own
    semantics: a bare NodeProto is evaluated at the newest opset by the reference evaluator."""
    b = Builder(opset=9, seed=35)
    x = image(b)
    scale = b.op("Unsqueeze", [b.const(np.arange(1, 9, dtype=np.float32))], axes=[1, 2])
    clipped = b.op("Clip", [b.const(np.asarray([-3.0, 0.5, 9.0], dtype=np.float32))],
                   min=0.0, max=1.0)
    h = b.op("Mul", [b.conv(x, 3, 8, name="conv0"), scale])
    b.output(b.conv(h, 8, 4, name="conv1"), clipped)
    model = b.build()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assert fold_constants(m) == 2
    values = initializers(m)
    assert values[clipped].tolist() == [0.0, 0.5, 1.0]
    assert values[scale].shape == (8, 1, 1)
    out, rep = api.compress(model, prune=0.5, target="fake", method="prune")
    assert rep.macs_after < rep.macs_before
    assert run(out, random_feeds(model))[1].tolist() == [0.0, 0.5, 1.0]


def test_layout_ops_on_large_constants_fold():
    """A Caffe2 export reshapes its Gemm weight at run time; the Gemm must still see a
    constant B however large."""
    b = Builder(seed=36)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [b.relu(b.conv(image(b), 3, 300, k=1,
                                                                   name="conv0"))])])
    w = b.weight("w4d", [1, 1, 300, 300])
    b.output(b.op("Gemm", [h, b.op("Reshape", [w, b.ints([300, 300])])], "fc", transB=1))
    model = b.build()
    assert group_sizes(model)[0] == (300, 300)


# -- computed operands the rewrite cannot cut ----------------------------------------------------
def test_computed_conv_bias_fixes_its_channels():
    b = Builder(seed=37)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0", bias=False), "r0")
    w = b.weight("w1", [8, 8, 3, 3])
    bias = b.input("bias", [8])
    y = b.op("Conv", [h, w, bias], "conv1", pads=[1, 1, 1, 1])
    b.output(b.conv(b.relu(y), 8, 4, name="conv2"))
    model = b.build()
    a = analysed(model)
    g = next(g for g in a.groups if "conv1" in g.producers)
    assert g.prunable == 0 and g.reasons() == ["8x Conv bias 'bias' is computed at run time"]
    out, _ = api.compress(model, prune=0.5, target="fake", method="prune")
    feeds = random_feeds(model)
    assert run(out, feeds)[0].shape == run(model, feeds)[0].shape


def test_dynamo_zero_bias_castlike_folds():
    """The raw dynamo graph gives a bias-free conv ``Expand(CastLike(0, x), [C])``."""
    b = Builder(seed=38)
    x = image(b)
    h = b.relu(b.conv(x, 3, 8, name="conv0", bias=False), "r0")
    zero = b.op("Expand", [b.op("CastLike", [b.const(np.float32(0.0)), h]), b.ints([8])])
    y = b.op("Conv", [h, b.weight("w1", [8, 8, 3, 3]), zero], "conv1", pads=[1, 1, 1, 1])
    b.output(b.conv(b.relu(y), 8, 4, name="conv2"))
    model = onnx.shape_inference.infer_shapes(b.build())  # dynamo writes value_info
    assert [s for s in group_sizes(model)[:2]] == [(8, 8), (8, 8)]
    out, rep = api.compress(model, prune=0.5, target="fake", method="prune")
    assert rep.macs_after < rep.macs_before
    assert run(out, random_feeds(model))[0].shape == (2, 4, 8, 8)


def test_castlike_passes_channels_of_its_first_input_only():
    b = Builder(seed=39)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    y = b.op("CastLike", [h, b.input("like", [1])], "cl")
    b.output(b.conv(y, 8, 4, name="conv1"))
    assert group_sizes(b.build())[0] == (8, 8)


def test_computed_per_channel_operand_is_reported():
    """``Mul(x, f(const))`` with an unfoldable per-channel factor: fixed, never left stale."""
    b = Builder(seed=40)
    h = b.relu(b.conv(image(b, hw=100), 3, 8, k=1, name="conv0"), "r0")
    big = b.const(np.random.default_rng(0).uniform(0.5, 1.5, (1, 8, 100, 100)))
    y = b.op("Mul", [h, b.op("Neg", [big])], "gate")  # 80 000 elements: not folded
    b.output(b.conv(y, 8, 4, k=1, name="conv1"))
    model = b.build()
    a_sizes = group_sizes(model)
    assert a_sizes[0] == (8, 0)
    out, _ = api.compress(model, prune=0.5, target="fake", method="prune")
    assert max_diff(model, out) < 1e-5


# -- compensation ---------------------------------------------------------------------------------
def mlp_tokens(act: str, zero=False, seed=41):
    """Tokens [N, 4, 16] -> MatMul + Add (bias first, as the legacy exporter writes it) ->
    activation -> MatMul + Add. Neuron 5 of the hidden layer is 2x neuron 1 (weights and bias)."""
    b = Builder(seed=seed)
    x = b.input("x", [BATCH, 4, 16])
    w1 = b.rng.standard_normal((16, 12)).astype(np.float32)
    b1 = b.rng.standard_normal(12).astype(np.float32)
    w1[:, 5], b1[5] = 2 * w1[:, 1], 2 * b1[1]
    h = b.op("Add", [b.const(b1, "fc1.bias"), b.op("MatMul", [x, b.const(w1, "fc1.weight")],
                                                   "fc1")], "fc1_bias")
    if act == "erf":  # 0.5 x (1 + erf(x / sqrt 2))
        e = b.op("Erf", [b.op("Div", [h, b.const(np.float32(np.sqrt(2.0)))])])
        h = b.op("Mul", [b.op("Mul", [h, b.op("Add", [e, b.const(np.float32(1.0))])]),
                         b.const(np.float32(0.5))])
    elif act == "silu":
        h = b.op("Mul", [h, b.op("Sigmoid", [h])])
    elif act == "hardswish_clip":  # x * Clip(x + 3, 0, 6) / 6 (TF/Keras exports)
        clip = b.op("Clip", [b.op("Add", [h, b.const(np.float32(3.0))]),
                             b.const(np.float32(0.0)), b.const(np.float32(6.0))])
        h = b.op("Div", [b.op("Mul", [h, clip]), b.const(np.float32(6.0))])
    elif act == "hardswish_hsig":  # x * HardSigmoid(x) (Paddle exports)
        h = b.op("Mul", [h, b.op("HardSigmoid", [h], alpha=1.0 / 6, beta=0.5)])
    elif act == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", [b.op("Pow", [h, b.const(np.float32(3.0))]),
                            b.const(np.float32(0.044715))])
        inner = b.op("Mul", [b.op("Add", [h, cube]), b.const(np.float32(np.sqrt(2 / np.pi)))])
        t = b.op("Add", [b.op("Tanh", [inner]), b.const(np.float32(1.0))])
        h = b.op("Mul", [b.op("Mul", [h, b.const(np.float32(0.5))]), t])
    elif act != "linear":
        h = b.op(act, [h])
    y = b.op("Add", [b.op("MatMul", [h, b.weight("fc2.weight", [12, 6])], "fc2"),
                     b.const(np.zeros(6, np.float32))])
    b.output(y)
    return b.build()


@pytest.mark.parametrize("act", ["linear", "Relu", "LeakyRelu"])
def test_linear_bias_add_is_part_of_the_layer(act):
    """The bias in the Add enters the statistics, so an exact multiple is reconstructed exactly
    through a positively homogeneous activation."""
    model = mlp_tokens(act)
    _, rep = api.compress(model, prune=0.5, method="udfc", target="fake")
    comp = compensations(rep)["fc1"]
    assert comp["compensated"] and comp["stats"] == "identity" and "activations" not in comp
    a = analysed(model)
    fc1 = next(n for n in a.model.graph.node if n.name == "fc1")
    stats, _ = layer_stats(weight_layer(fc1, a.channels.inits), a.channels.inits,
                           a.channels.consumers, {"add_3"})
    bias = numpy_helper.to_array(a.channels.inits["fc1.bias"])
    assert np.allclose(stats.beta, bias)  # the Add's constant is the layer's bias K
    # exactness: prune exactly neuron 5 (the multiple) through the public passes
    p = api.plan(a, 0.0)
    g = next(g for g in a.groups if "fc1" in g.producers)
    p.removed[g.classes[5]] = True
    from onnx_udfc.config import MethodOptions
    from onnx_udfc.methods.compensate import MethodRun, compensate_pruning

    run = MethodRun(MethodOptions("udfc", alpha1=1.0))
    entry = compensate_pruning(a.channels, p.removed, run)["fc1"]
    assert entry["compensated"] and entry["predicted_error"] < 1e-3
    api.prune(a, p)
    assert max_diff(model, a.model) < 1e-3


def _token_error(model: onnx.ModelProto, compressed: onnx.ModelProto) -> float:
    """RMS output error relative to the output's spread, on 256 Gaussian token batches."""
    x = np.random.default_rng(7).standard_normal((256, 4, 16)).astype(np.float32)
    ref, out = run(model, {"x": x})[0], run(compressed, {"x": x})[0]
    return float(np.sqrt(np.mean((out - ref) ** 2)) / ref.std())


@pytest.mark.parametrize("sequential", [False, True])
def test_token_mlps_are_sampled_and_their_mean_lands_in_the_bias_add(sequential, monkeypatch):
    """A MatMul over tokens ``[N, T, C]`` has its channels last: ``auto`` samples it (the
    propagation models channels on axis 1 and had no moments for it), the sequential fit
    reads the channels on that axis (it indexed T before), and the pruned neurons' mean goes
    into the constant of the Add the exporter wrote the bias as (it was dropped)."""
    from onnx_udfc.methods import plus

    model = mlp_tokens("erf")
    plain, _ = api.compress(model, prune=0.5, method="prune", target="fake")
    out, rep = api.compress(model, prune=0.5, method="udfc+", sequential=sequential,
                            target="fake")
    onnx.checker.check_model(out, full_check=True)
    assert rep.moments["used"] == "sampled"
    comp = compensations(rep)["fc1"]
    assert comp["compensated"] and not comp.get("constant_skipped"), comp
    error = _token_error(model, out)
    assert error < 0.85 * _token_error(model, plain)
    monkeypatch.setattr(plus, "follower_bias", lambda *args: None)  # the mean dropped, as before
    dropped, rep = api.compress(model, prune=0.5, method="udfc+", sequential=sequential,
                                target="fake")
    assert compensations(rep)["fc1"]["constant_skipped"] == ["fc2"]
    assert error < 0.9 * _token_error(model, dropped)


RELU_LIKE = [("erf", ["Add", "Erf", "Mul"]), ("silu", ["Mul", "Sigmoid"]), ("Gelu", ["Gelu"]),
             ("gelu_tanh", ["Add", "Mul", "Pow", "Tanh"]),
             ("HardSwish", ["HardSwish"]), ("Elu", ["Elu"]),
             ("hardswish_clip", ["Add", "Clip", "Mul"]),  # the /6 is a scale
             ("hardswish_hsig", ["HardSigmoid", "Mul"])]


@pytest.mark.parametrize("act,names", RELU_LIKE)
def test_relu_like_activations_are_crossed_and_reported(act, names):
    model = mlp_tokens(act) if act != "Gelu" else _gelu20()
    _, rep = api.compress(model, prune=0.5, method="udfc", bits=6, target="fake")
    comp, q = compensations(rep)["fc1"], quantizations(rep)["fc1"]
    assert comp["compensated"] and comp["activations"] == names
    assert q["scale_compensated"] and q["activations"] == names
    old = compensate.PRUNE_THROUGH_CURVED, compensate.SCALE_THROUGH_CURVED
    compensate.PRUNE_THROUGH_CURVED = compensate.SCALE_THROUGH_CURVED = False
    try:
        _, rep = api.compress(model, prune=0.5, method="udfc", bits=6, target="fake")
    finally:
        compensate.PRUNE_THROUGH_CURVED, compensate.SCALE_THROUGH_CURVED = old
    assert "not positively homogeneous" in compensations(rep)["fc1"]["reason"]
    assert "not positively homogeneous" in quantizations(rep)["fc1"]["reason"]


@pytest.mark.parametrize("act", ["Sigmoid", "Tanh", "HardSigmoid"])
def test_saturating_activations_are_not_crossed(act):
    _, rep = api.compress(mlp_tokens(act), prune=0.5, method="udfc", bits=6, target="fake")
    for entry in (compensations(rep)["fc1"], quantizations(rep)["fc1"]):
        assert entry.get("compensated", entry.get("scale_compensated")) is False
        assert f"{act}, a saturating activation" in entry["reason"]


def _gelu20() -> onnx.ModelProto:
    model = mlp_tokens("linear")
    g = model.graph
    i = next(k for k, n in enumerate(g.node) if n.name == "fc1_bias")
    g.node.insert(i + 1, helper.make_node("Gelu", ["fc1_bias"], ["gelu"], name="gelu"))
    next(n for n in g.node if n.name == "fc2").input[0] = "gelu"
    model.opset_import[0].version = 20
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("act", ["Relu", "Clip6", "HardSwish", "Sigmoid"])
def test_scale_with_a_batchnorm_goes_into_it_before_a_curved_activation(act):
    """ReLU: the next layer's columns (the paper). ReLU6, HardSwish, even Sigmoid: the BN's
    gamma and beta, so the activation sees the rescaled pre-activation (exact)."""
    b = Builder(seed=42)
    h = b.bn(b.conv(image(b), 3, 8, name="conv0", bias=False), 8, "bn0")
    if act == "Clip6":
        h = b.op("Clip", [h, b.const(np.float32(0.0)), b.const(np.float32(6.0))])
    else:
        h = b.op(act, [h])
    b.output(b.conv(h, 8, 4, name="conv1"))
    model = b.build()
    out, rep = api.compress(model, bits=6, method="udfc", target="fake")
    q = quantizations(rep)["conv0"]
    assert q["scale_compensated"]
    assert q.get("scale_into") == (None if act == "Relu" else "batchnorm")
    assert "activations" not in q
    gamma = initializers(out)["bn0.scale"]
    original = initializers(model)["bn0.scale"]
    assert np.array_equal(gamma, original) == (act == "Relu")


def test_squeeze_excite_gate_takes_the_scale_and_split_readers_take_subsets():
    b = Builder(seed=43)
    h = b.relu(b.bn(b.conv(image(b), 3, 8, name="conv0", bias=False), 8, "bn0"))
    gate = b.op("Sigmoid", [b.conv(b.relu(b.conv(b.op("GlobalAveragePool", [h]), 8, 4, k=1,
                                                   name="fc1")), 4, 8, k=1, name="fc2")])
    y = b.op("Mul", [gate, h], "se")
    left, right = b.op("Split", [y], "split", outputs=2, axis=1)
    b.output(b.conv(left, 4, 2, name="convl"), b.conv(right, 4, 2, name="convr"))
    model = b.build()
    _, rep = api.compress(model, bits=6, method="udfc", target="fake")
    assert quantizations(rep)["conv0"]["scale_compensated"]
    _, rep = api.compress(model, prune=0.5, method="udfc", prune_coupled=True, target="fake")
    # the gate ties conv0's channels to fc2's: a coupled group, never reconstructed across
    assert "coupled" in compensations(rep)["conv0"]["reason"]


def test_conv_transpose_absorbs_a_reconstruction_exactly():
    """U-Net decoders: Conv -> ReLU -> ConvTranspose; the transposed conv's weight takes the
    correction on its input-channel axis (axis 0)."""
    b = Builder(seed=46)
    c0 = b.conv(image(b), 3, 8, name="conv0")
    w, bias = b.arrays["conv0.weight"], b.arrays["conv0.bias"]
    w[5], bias[5] = 3 * w[1], 3 * bias[1]
    b.output(b.conv_t(b.relu(c0), 8, 4, name="up"))
    model = b.build()
    a = analysed(model)
    p = api.plan(a, 0.0)
    g = next(g for g in a.groups if "conv0" in g.producers)
    p.removed[g.classes[5]] = True
    from onnx_udfc.config import MethodOptions
    from onnx_udfc.methods.compensate import MethodRun, compensate_pruning

    entry = compensate_pruning(a.channels, p.removed, MethodRun(MethodOptions("udfc")))["conv0"]
    assert entry["compensated"] and entry["absorbers"] == ["up"]
    api.prune(a, p)
    assert max_diff(model, a.model) < 1e-3


def test_dropout_mask_does_not_block_compensation():
    b = Builder(opset=9, seed=44)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    d = b.op("Dropout", [h], "drop", outputs=2)[0]
    b.output(b.conv(d, 8, 4, name="conv1"))
    _, rep = api.compress(b.build(), prune=0.5, method="udfc", target="fake")
    assert compensations(rep)["conv0"]["compensated"]


def test_all_or_nothing_when_a_reader_cannot_be_mapped():
    """A reader after a channel shuffle cannot take the correction: nothing is changed."""
    b = Builder(seed=45)
    h = b.relu(b.conv(image(b), 3, 8, name="conv0"), "r0")
    s = b.op("Reshape", [b.op("Transpose", [b.op("Reshape", [h, b.ints([0, 2, 4, 8, 8])])],
                                            perm=[0, 2, 1, 3, 4]), b.ints([0, 8, 8, 8])])
    b.output(b.conv(h, 8, 4, name="conv1"), b.conv(s, 8, 4, name="conv2"))
    _, rep = api.compress(b.build(), bits=6, method="udfc", target="fake")
    q = quantizations(rep)["conv0"]
    assert not q["scale_compensated"] and "cannot follow" in q["reason"]
