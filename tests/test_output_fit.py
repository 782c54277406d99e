"""Output-space refit of the next Conv in --sequential udfc+ (onnx_udfc.methods.output_fit)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.core import normalize
from onnx_udfc.core.ort import session
from onnx_udfc.methods import output_fit
from onnx_udfc.methods import plus as udfc_plus
from onnx_udfc.methods.output_fit import patches, ridge_fit
from tests.helpers import bn_node, compensations, conv_node


def test_ridge_fit_is_least_squares_and_keeps_unweighted_outputs():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    w = rng.normal(size=(6, 3))
    y = p @ w + np.array([1.0, -2.0, 0.5])
    fitted, c = ridge_fit(p, y, np.zeros((6, 3)), 1e-9)
    np.testing.assert_allclose(fitted, w, atol=1e-5)
    np.testing.assert_allclose(c, [1.0, -2.0, 0.5], atol=1e-5)
    w0 = rng.normal(size=(6, 3))
    kept, _ = ridge_fit(p, y, w0, 0.1, weight=np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(kept[:, 1], w0[:, 1], atol=1e-12)
    # a weighted output is the ridge with lam / s_o: compare with the closed form
    pc = p - p.mean(0)
    cov = pc.T @ pc / len(p)
    r = 0.1 * np.mean(np.diag(cov)) / (2.0 / 1.0)
    direct = np.linalg.solve(cov + r * np.eye(6), pc.T @ (y[:, 2] - y[:, 2].mean()) / len(p)
                             + r * w0[:, 2])
    np.testing.assert_allclose(kept[:, 2], direct, rtol=1e-8)


@pytest.mark.parametrize(("k", "pads", "stride"), [(3, [1, 1, 1, 1], 1), (3, [1, 0, 1, 2], 2),
                                                   (1, [0, 0, 0, 0], 2)])
def test_patches_reproduce_onnx_conv(k, pads, stride):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    w = rng.normal(size=(4, 3, k, k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], pads=pads,
                            strides=[stride, stride])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(x.shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    y = session(helper.make_model(graph)).run(None, {"x": x})[0]
    p = patches(x, [k, k], pads, [stride, stride])
    got = (p @ w.reshape(4, -1).T.astype(np.float64)).reshape(2, y.shape[2], y.shape[3], 4)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), y, atol=1e-4)


def residual_block(folded: bool = False) -> onnx.ModelProto:
    """convA-bnA-relu (pruned, absorbed by conv0) -> conv0-bn0-relu = r0 (the shortcut) ->
    conv1-bn1-relu (pruned, absorbed by conv2) -> conv2-bn2 + r0 -> relu -> GAP; ``folded``:
    every BN folded into its Conv, as deployed exports have it."""
    rng = np.random.default_rng(4)
    inits: list = []
    n = [conv_node("ca", "x", 3, 8, rng, inits), bn_node("ba", "ca_y", 8, rng, inits)]
    n.append(helper.make_node("Relu", ["ba_y"], ["ra"]))
    n += [conv_node("c0", "ra", 8, 6, rng, inits), bn_node("b0", "c0_y", 6, rng, inits)]
    n.append(helper.make_node("Relu", ["b0_y"], ["r0"]))
    n += [conv_node("c1", "r0", 6, 8, rng, inits), bn_node("b1", "c1_y", 8, rng, inits)]
    n.append(helper.make_node("Relu", ["b1_y"], ["r1"]))
    n += [conv_node("c2", "r1", 8, 6, rng, inits), bn_node("b2", "c2_y", 6, rng, inits)]
    n.append(helper.make_node("Add", ["b2_y", "r0"], ["sum"]))
    n.append(helper.make_node("Relu", ["sum"], ["rs"]))
    n.append(helper.make_node("GlobalAveragePool", ["rs"], ["out"]))
    graph = helper.make_graph(
        n, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 6, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if folded:
        normalize.fold_batchnorm(model)
        assert not any(node.op_type == "BatchNormalization" for node in model.graph.node)
    return model


def _error(model, out, x) -> float:
    return float(np.mean((session(out).run(None, {"x": x})[0]
                          - session(model).run(None, {"x": x})[0]) ** 2))


@pytest.mark.parametrize("folded", [False, True], ids=["bn-kept", "bn-folded"])
def test_output_refit_lowers_the_error_and_cancels_the_shortcut_drift(monkeypatch, folded):
    model = residual_block(folded)
    x = np.random.default_rng(5).normal(size=(64, 3, 8, 8)).astype(np.float32)
    errors, reports = {}, {}
    real_target = output_fit.output_target
    for mode in ("off", "no shortcut", "on"):
        monkeypatch.setattr(udfc_plus, "DEFAULT", dataclasses.replace(
            udfc_plus.PlusConfig(), seq_output=mode != "off"))
        monkeypatch.setattr(output_fit, "output_target", (
            lambda *a: dataclasses.replace(real_target(*a), shortcut=None))
            if mode == "no shortcut" else real_target)
        out, report = api.compress(model, prune=0.5, method="udfc+", calibration=x,
                                   sequential=True, target="fake")
        onnx.checker.check_model(out, full_check=True)
        errors[mode] = _error(model, out, x)
        reports[mode] = {k: c.get("output_refit") for k, c in compensations(report).items()}
    assert reports["off"] and not any(reports["off"].values())
    assert sorted(v[0] for v in reports["on"].values() if v) == ["c0", "c2"]
    # the refit is least squares on these very inputs: it can only help in-sample, and the
    # shortcut term removes what convA's pruning sends down the shortcut into the Add
    assert errors["no shortcut"] < errors["off"]
    assert errors["on"] < errors["no shortcut"]


def test_output_target_only_takes_plain_convs_reading_the_tensor():
    ctx = api.analyse(residual_block(), {"x": [1, 3, 8, 8]}).channels
    nodes = {n.name: n for n in ctx.graph.node}
    t = output_fit.output_target(ctx, nodes["c2"], "r1")
    assert t is not None and t.batchnorm.name == "b2" and t.shortcut == "r0"
    assert output_fit.output_target(ctx, nodes["c0"], "ra").shortcut is None
    assert output_fit.output_target(ctx, nodes["c2"], "r0") is None  # not its input
    nodes["c2"].attribute.append(helper.make_attribute("group", 2))
    assert output_fit.output_target(ctx, nodes["c2"], "r1") is None


def test_a_folded_conv_summed_by_a_residual_add_has_the_other_input_as_shortcut():
    ctx = api.analyse(residual_block(folded=True), {"x": [1, 3, 8, 8]}).channels
    nodes = {n.name: n for n in ctx.graph.node}
    t = output_fit.output_target(ctx, nodes["c2"], "r1")
    assert t is not None and t.batchnorm is None and t.shortcut == "r0"
    assert output_fit.output_target(ctx, nodes["c0"], "ra").shortcut is None
