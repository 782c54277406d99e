"""Integer (qdq) storage: layout, identity with the fake twin in ONNX Runtime, size on disk."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_udfc import api
from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.ort import make_inputs
from onnx_udfc.quant.grids import quantize_blocks_params
from onnx_udfc.quant.qdq import convert_opset, integer_tensor
from tests.helpers import quantizations

MODES = {
    "int8-tensor": dict(bits=8, granularity="tensor"),
    "int8-channel": dict(bits=8, granularity="channel"),
    "int4-channel": dict(bits=4, granularity="channel"),
    "int4-block": dict(bits=4, block_size=16),
}


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 3, 3)])
def test_integer_tensor_roundtrip(dtype: str, shape: tuple[int, ...]) -> None:
    lo, hi = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}[dtype]
    q = np.random.default_rng(0).integers(lo, hi + 1, size=shape)
    t = integer_tensor("q", q, dtype)
    back = numpy_helper.to_array(t)
    np.testing.assert_array_equal(back.astype(np.int32), q)
    if dtype.endswith("4"):  # packed: two codes per byte
        assert len(t.raw_data) == (q.size + 1) // 2


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_blocks_follow_onnx_blocked_dequantize(scheme: str) -> None:
    """Scale layout and codes are those of ONNX's blocked DequantizeLinear (reference
    implementation), including a shorter last block."""
    w = np.random.default_rng(1).standard_normal((4, 10, 3, 3)).astype(np.float32)
    r = quantize_blocks_params(w, 4, scheme, 4, np.float32)
    assert r.scale.shape == (4, 3, 3, 3) and r.block_size == 4 and r.axis == 1
    for b, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 10)]):
        block = w[:, lo:hi].astype(np.float64)
        span = np.abs(block).max(1) / 7 if scheme == "symmetric" else \
            (np.maximum(block.max(1), 0) - np.minimum(block.min(1), 0)) / 15
        np.testing.assert_allclose(r.scale[:, b], span, rtol=1e-6)
    dtype = "int4" if scheme == "symmetric" else "uint4"
    inits = [integer_tensor("q", r.q, dtype), numpy_helper.from_array(
        r.scale.astype(np.float32), "s"), integer_tensor("z", r.zero_point, dtype)]
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1, block_size=4)
    g = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(
        "w", TensorProto.FLOAT, list(w.shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    np.testing.assert_array_equal(ReferenceEvaluator(m).run(None, {})[0], r.dequantized)


def _session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Idle ORT threads spin for a while after each run; on a 2-core machine they starve the
    # NumPy/BLAS work of the next compress call.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ORT fuses int4 DequantizeLinear + MatMul into MatMulNBits, which by default quantizes
    # activations to int8: pin the accuracy level so the comparison measures our weights.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _models(path, mode: str):
    # The fake twin has no integer storage, so no --float-share: neither has float layers.
    kw = dict(MODES[mode], quantizer="symmetric", check=False, float_share=0.0)
    fake, _ = api.compress(str(path), format="fake", **kw)
    qdq, report = api.compress(str(path), format="qdq", **kw)
    return fake, qdq, report


def _identity(path, mode: str) -> None:
    fake, qdq, report = _models(path, mode)
    onnx.checker.check_model(qdq, full_check=True)
    want = "int4" if MODES[mode]["bits"] <= 4 else "int8"
    assert set(report.storage["weights"]) == {want}
    assert report.storage["opset_after"] == (21 if want == "int4" else 17)
    # The dequantized weights are bit-identical to the fake twin's float weights...
    dq = [n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert dq
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in dq)
    feed, _ = make_inputs(fake, batch=4)
    got = _session(probe).run(None, feed)
    floats = {t.name: tensor_array(t) for t in fake.graph.initializer}
    for name, value in zip(dq, got[len(qdq.graph.output):], strict=True):
        np.testing.assert_array_equal(value, floats[name])
    # ... so the outputs agree within 1e-5 (exactly for Conv; ORT's Gemm kernel sums a
    # constant and a computed weight in different orders).
    for a, b in zip(_session(fake).run(None, feed), got[:len(qdq.graph.output)], strict=True):
        assert np.abs(a - b).max() <= 1e-5
    # With full optimisation ORT fuses BatchNorm into Conv only in the fake model (its weight
    # is constant): rounding-level differences, nothing more.
    for a, b in zip(_session(fake, True).run(None, feed), _session(qdq, True).run(None, feed),
                    strict=True):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


# Every mode on ResNet-20 (BN kept), two on ResNet-20 with BN folded (bias path), one each
# on ResNet-56 with BN kept and folded, to keep the file fast.
@pytest.mark.parametrize("name, mode", [("resnet20_cifar10_bn", m) for m in MODES] + [
    ("resnet20_cifar10_folded", "int8-tensor"), ("resnet20_cifar10_folded", "int4-block"),
    ("resnet56_cifar10_nm_bn", "int4-channel"), ("resnet56_cifar10_nm_folded", "int8-channel")])
def test_qdq_matches_fake_twin_on_shared_resnets(shared_model, name: str, mode: str) -> None:
    _identity(shared_model(name), mode)


@pytest.mark.parametrize("mode", list(MODES))
def test_qdq_matches_fake_twin_on_digits_and_lenet(shared_model, digits_model,
                                                   mode: str) -> None:
    _identity(digits_model, mode)
    _identity(shared_model("lenet300100_fashionmnist_nm"), mode)  # Gemm path


def test_pruned_udfc_and_asymmetric_store_and_match(digits_model) -> None:
    kw = dict(prune=0.3, method="udfc", bits=3, quantizer="asymmetric", granularity="channel",
              check=False)
    fake, _ = api.compress(str(digits_model), **kw)
    qdq, report = api.compress(str(digits_model), format="qdq", **kw)
    assert set(report.storage["weights"]) == {"uint4"}
    stored = [q["storage"] for q in quantizations(report).values()]
    assert all(s["dtype"] == "uint4" and s["zero_point"] and s["bits"] == 3 for s in stored)
    assert sum(s["bytes"] for s in stored) < sum(s["float_bytes"] for s in stored) / 4
    feed, _ = make_inputs(fake, batch=4)
    np.testing.assert_array_equal(_session(fake).run(None, feed)[0],
                                  _session(qdq).run(None, feed)[0])


def test_int8_container_for_low_bits_keeps_opset(digits_model) -> None:
    qdq, report = api.compress(str(digits_model), bits=4, quantizer="symmetric",
                               granularity="channel", format="qdq", container="int8",
                                   target="fake", method="prune")
    assert report.storage["weights"] == {"int8": 7}
    assert report.storage["opset_after"] == 17
    codes = [numpy_helper.to_array(t) for t in qdq.graph.initializer
             if t.name.endswith("_quantized")]
    assert all(c.dtype == np.int8 and np.abs(c).max() <= 7 for c in codes)


def test_explicit_opset_and_skeleton_conversion_keep_weights(digits_model) -> None:
    model = onnx.load(str(digits_model))
    conv, redeclared = convert_opset(model, 21, "test")
    assert conv.opset_import[0].version == 21 and redeclared == []
    before = {t.name: t.raw_data for t in model.graph.initializer}
    after = {t.name: t.raw_data for t in conv.graph.initializer}
    assert after.keys() >= before.keys()
    assert all(after[k] == v for k, v in before.items())
    _, report = api.compress(str(digits_model), bits=8, quantizer="symmetric", format="qdq",
                             opset=22, target="fake", method="prune")
    assert report.storage["opset_after"] == 22 and report.storage["ir_version"] >= 10


def test_an_output_declared_with_the_wrong_rank_is_redeclared_and_reported(digits_model):
    """ddddocr's recogniser declares [1, seqlen] for a [T, 1, K] output: ONNX Runtime runs it,
    opset 21's shape inference refuses it. int4 storage declares the computed shape and says
    so; the values do not change."""
    model = onnx.load(str(digits_model))
    out = model.graph.output[0]
    computed = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    out.type.tensor_type.shape.CopyFrom(onnx.helper.make_tensor_type_proto(
        onnx.TensorProto.FLOAT, ["seqlen"]).tensor_type.shape)
    qdq, report = api.compress(model, target="int4")
    onnx.checker.check_model(qdq, full_check=True)
    (change,) = report.storage["outputs_redeclared"]
    assert change["declared"] == "[seqlen]" and len(computed) == 2
    assert change["computed"].count(",") == 1
    assert f"output '{out.name}' declared [seqlen] but computed" in report.summary()
    feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(
        (2, 1, 8, 8)).astype(np.float32)}
    assert _session(qdq).run(None, feed)[0].shape == (2, 10)


def _weight_bytes(model: onnx.ModelProto) -> int:
    names = {n.input[1] for n in model.graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    return sum(len(t.raw_data) for t in model.graph.initializer if t.name in names)


@pytest.mark.parametrize("name", ["resnet20_cifar10_bn", "resnet56_cifar10_nm_folded"])
def test_file_size_targets(shared_model, tmp_path, name: str) -> None:
    """int8 <= 0.27x and int4 <= 0.15x of the FP32 weights, scales and DequantizeLinear nodes
    included; the whole file meets it once BN is folded (BN statistics and the graph itself
    are 2.3 % of these small files and stay as they are). Full table: tools/bench_size.py."""
    path = shared_model(name)
    fp32 = path.stat().st_size
    weights = _weight_bytes(onnx.load(str(path)))
    rest = fp32 - weights
    for bits, target in ((8, 0.27), (4, 0.15)):
        for fold in (False, True) if "folded" not in name else (False,):
            model, _ = api.compress(str(path), bits=bits, quantizer="symmetric",
                                    granularity="channel", format="qdq", fold_bn=fold,
                                    check=False, target="fake", method="prune")
            size = api.save_compressed(model, tmp_path / f"{bits}{fold}.onnx", check=False)
            assert size - rest <= target * weights, (bits, fold, size / fp32)
            if fold or "folded" in name:
                assert size <= target * fp32, (bits, fold, size / fp32)


def test_matmul_int4_blocks_need_the_pinned_accuracy_level() -> None:
    """ORT turns int4 DequantizeLinear + MatMul into MatMulNBits; its default accuracy level
    quantizes activations, the pinned level 0 reproduces the fake twin exactly."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("MatMul", ["b", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    kw = dict(bits=4, quantizer="symmetric", block_size=32)
    fake, _ = api.compress(model, **kw)
    qdq, report = api.compress(model, format="qdq", **kw)
    assert report.storage["weights"] == {"int4": 2}
    x = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    ref = _session(fake).run(None, x)[0]
    np.testing.assert_array_equal(_session(qdq).run(None, x)[0], ref)
    np.testing.assert_array_equal(_session(qdq, optimize=True).run(None, x)[0], ref)


@pytest.mark.parametrize("bits, opset", [(8, 13), (4, 21)])
def test_old_ir_model_with_weights_as_inputs_converts(bits: int, opset: int) -> None:
    """IR 3 lists every initializer among the inputs: those entries go, the opset is raised
    (9 -> 13 for per-channel int8, -> 21 for int4) and the result matches the fake twin."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
              helper.make_tensor_value_info("w1", TensorProto.FLOAT, [16, 3, 3, 3]),
              helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 16, 3, 3])]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, 4, 6, 6])], [numpy_helper.from_array(w1, "w1"),
                                                 numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    kw = dict(bits=bits, quantizer="symmetric", granularity="channel", target="fake",
              method="prune")
    fake, _ = api.compress(model, **kw)
    qdq, report = api.compress(model, format="qdq", **kw)
    assert report.storage["opset_after"] == opset and [i.name for i in qdq.graph.input] == ["x"]
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(_session(qdq).run(None, x)[0], _session(fake).run(None, x)[0])


def test_size_counts_weights_held_by_constant_nodes(digits_model) -> None:
    """paddle2onnx writes every weight as a Constant node: the size (and --budget-size's
    reference) must count them, or 4-bit reads as 7.9x the original."""
    from onnx_udfc.core.io import approx_size

    model = onnx.load(str(digits_model))
    as_constants = onnx.ModelProto()
    as_constants.CopyFrom(model)
    del as_constants.graph.initializer[:]
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t)
             for t in model.graph.initializer]
    nodes += list(model.graph.node)
    del as_constants.graph.node[:]
    as_constants.graph.node.extend(nodes)
    assert abs(approx_size(as_constants) - approx_size(model)) < 0.05 * approx_size(model)
