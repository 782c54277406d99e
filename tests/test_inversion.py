"""Model inversion (``--moments inverted``): the reverse pass appended to the ONNX graph, the
Adam fit to the BatchNorm statistics, and its use by udfc+."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.ort import session
from onnx_udfc.moments import inverted as inversion
from onnx_udfc.moments import sampled as synthetic
from onnx_udfc.moments.inverted import (
    cached_inverted_inputs,
    group_count,
    inversion_model,
    inverted_inputs,
)
from onnx_udfc.report.report import Progress
from tests.helpers import (
    assert_refused,
    bn_node,
    cli,
    compensations,
    conv_node,
    initializers,
)


def residual_net(extra: str | None = None, opset: int = 17, head: bool = False
                 ) -> onnx.ModelProto:
    """conv-bn-relu, a strided conv with a Slice+Pad shortcut (ResNet 'option A'), an Add, a
    LeakyRelu, a Concat, a Clip and a MaxPool: every rule of the reverse pass on one path.
    ``head``: a classifier (AveragePool, Flatten, Gemm, Softmax) instead of the pooled map."""
    rng = np.random.default_rng(0)
    inits: list = []
    n = [conv_node("c1", "x", 3, 4, rng, inits), bn_node("b1", "c1_y", 4, rng, inits)]
    n.append(helper.make_node("Relu", ["b1_y"], ["r1"]))
    n += [conv_node("c2", "r1", 4, 8, rng, inits, stride=2),
          bn_node("b2", "c2_y", 8, rng, inits)]
    for name, value in (("s_starts", [0, 0]), ("s_ends", [1 << 30, 1 << 30]),
                        ("s_axes", [2, 3]), ("s_steps", [2, 2]),
                        ("p_pads", [0, 2, 0, 0, 0, 2, 0, 0])):
        inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    n.append(helper.make_node("Slice", ["r1", "s_starts", "s_ends", "s_axes", "s_steps"],
                              ["sl"]))
    n.append(helper.make_node("Pad", ["sl", "p_pads"], ["pd"], mode="constant"))
    n.append(helper.make_node("Add", ["b2_y", "pd"], ["sum"]))
    n.append(helper.make_node("LeakyRelu", ["sum"], ["lr"], alpha=0.1))
    last = "lr"
    if extra:
        n.append(helper.make_node(extra, ["lr"], ["odd"]))
        last = "odd"
    n.append(helper.make_node("Concat", [last, "lr"], ["cat"], axis=1))
    n += [conv_node("c3", "cat", 16, 6, rng, inits), bn_node("b3", "c3_y", 6, rng, inits)]
    inits += [numpy_helper.from_array(np.asarray(0.0, np.float32), "lo"),
              numpy_helper.from_array(np.asarray(6.0, np.float32), "hi")]
    n.append(helper.make_node("Clip", ["b3_y", "lo", "hi"], ["cl"]))
    n.append(helper.make_node("MaxPool", ["cl"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]))
    n += [conv_node("c4", "mp", 6, 5, rng, inits, k=1), bn_node("b4", "c4_y", 5, rng, inits)]
    out = [1, 5, 1, 1]
    if head:
        inits += [numpy_helper.from_array(rng.normal(0, 1, (3, 5)).astype(np.float32), "fc_w"),
                  numpy_helper.from_array(rng.normal(0, 1, 3).astype(np.float32), "fc_b")]
        n += [helper.make_node("AveragePool", ["b4_y"], ["ap"], kernel_shape=[2, 2],
                               strides=[2, 2]),
              helper.make_node("Flatten", ["ap"], ["fl"]),
              helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["logits"], transB=1),
              helper.make_node("Softmax", ["logits"], ["out"], axis=1)]
        out = [1, 3]
    else:
        n.append(helper.make_node("GlobalAveragePool", ["b4_y"], ["out"]))
    graph = helper.make_graph(
        n, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _probe(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` with any batch size that also outputs these tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    return probe


def _without_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every BatchNormalization turned into an Identity."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "BatchNormalization":
            node.op_type = "Identity"
            del node.input[1:]
    return out


def _reference_loss(model: onnx.ModelProto, x: np.ndarray, groups: int = 1) -> float:
    """The BN-statistics loss recomputed in NumPy from the network's own tensors, averaged
    over ``groups`` consecutive groups of the batch."""
    bns = [nd for nd in model.graph.node if nd.op_type == "BatchNormalization"]
    names = [nd.input[0] for nd in bns]
    values = session(_probe(model, names)).run(names, {"x": x})
    inits = initializers(model)
    total = 0.0
    for nd, v in zip(bns, values, strict=True):
        for part in np.split(v.astype(np.float64), groups):
            total += np.linalg.norm(part.mean((0, 2, 3)) - inits[nd.input[3]]) / groups
            total += np.linalg.norm(part.var((0, 2, 3)) - inits[nd.input[4]]) / groups
    return total


@pytest.mark.parametrize(("batch", "group_size", "groups"), [(4, 16, 1), (8, 2, 4), (6, 4, 1)])
def test_inversion_loss_is_the_bn_statistics_distance(batch, group_size, groups):
    assert group_count(batch, group_size) == groups
    model = residual_net()
    inv, name, count, stopped = inversion_model(model, batch, group_size)
    onnx.checker.check_model(inv, full_check=True)
    assert (name, count, stopped) == ("x", 4, [])
    x = np.random.default_rng(1).normal(size=(batch, 3, 8, 8)).astype(np.float32)
    loss = session(inv).run(["udfc_inversion_loss"], {"x": x})[0]
    assert float(loss) == pytest.approx(_reference_loss(model, x, groups), rel=1e-4)


def _class_loss(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Cross-entropy of the logits to the labels i mod K, recomputed in NumPy."""
    z = session(_probe(model, ["logits"])).run(["logits"], {"x": x})[0].astype(np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.arange(len(z)) % z.shape[1]].mean())


def test_class_prior_adds_the_cross_entropy_and_its_gradient_crosses_the_head():
    model = residual_net(head=True)
    inv, _, count, stopped = inversion_model(model, 6, 16, class_weight=0.5)
    onnx.checker.check_model(inv, full_check=True)
    assert (count, stopped) == (4, [])
    sess = session(inv)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3, 8, 8)).astype(np.float32)

    def reference(v: np.ndarray) -> float:
        return _reference_loss(model, v) + 0.5 * _class_loss(model, v)

    loss, grad = sess.run(["udfc_inversion_loss", "udfc_inversion_grad"], {"x": x})
    assert float(loss) == pytest.approx(reference(x), rel=1e-4)
    x64 = x.astype(np.float64)
    for _ in range(4):
        d = rng.normal(size=x.shape) * 1e-3
        up, down = reference((x64 + d).astype(np.float32)), reference((x64 - d).astype(np.float32))
        assert (up - down) / 2 == pytest.approx(float((grad * d).sum()), rel=0.05, abs=1e-5)
    # without the prior only the BN distance is left; the head carries no gradient then
    bn_only = session(inversion_model(model, 6, 16, class_weight=0.0)[0])
    assert float(bn_only.run(["udfc_inversion_loss"], {"x": x})[0]) == pytest.approx(
        _reference_loss(model, x), rel=1e-4)


def test_groups_divide_the_batch():
    assert [group_count(n) for n in (1, 15, 16, 128, 100, 97)] == [1, 1, 1, 8, 5, 1]


@pytest.mark.parametrize(("opset", "groups"), [(13, 1), (17, 2), (18, 1)])
def test_inversion_gradient_matches_finite_differences(opset, groups):
    model = residual_net(opset=opset)
    inv, name, _, stopped = inversion_model(model, 4, 4 // groups)
    assert stopped == []
    sess = session(inv)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    grad = sess.run(["udfc_inversion_grad"], {"x": x})[0]
    assert grad.shape == x.shape and np.abs(grad).max() > 0
    x64 = x.astype(np.float64)
    for _ in range(4):
        d = rng.normal(size=x.shape) * 1e-3
        up = _reference_loss(model, (x64 + d).astype(np.float32), groups)
        down = _reference_loss(model, (x64 - d).astype(np.float32), groups)
        assert (up - down) / 2 == pytest.approx(float((grad * d).sum()), rel=0.05, abs=1e-5)


def test_an_op_without_a_rule_stops_the_gradient_and_is_reported():
    model = residual_net(extra="Softsign")
    _, _, _, stopped = inversion_model(model, 2)
    assert stopped == ["Softsign"]
    fit = inverted_inputs(model, steps=3)
    assert fit.stopped == ["Softsign"]
    assert fit.summary()["gradient_stopped_at"] == ["Softsign"]


def test_inversion_needs_batchnorm_and_a_static_input():
    model = residual_net()
    with pytest.raises(UdfcError, match="BatchNormalization"):
        inversion_model(_without_batchnorm(model), 2)
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    with pytest.raises(UdfcError, match="static input shape"):
        inverted_inputs(dynamic, steps=1)


def test_fit_drives_the_statistics_toward_the_running_ones():
    model = residual_net()
    ticks = []
    fit = inverted_inputs(model, steps=150, progress=lambda i, n, loss: ticks.append(i))
    assert ticks == list(range(1, 151))
    x = fit.feed["x"]
    assert x.shape == (synthetic.SAMPLES, 3, 8, 8) and x.dtype == np.float32
    assert fit.loss_end < 0.6 * fit.loss_start  # a random toy net: not every target is reachable
    assert fit.loss_end == pytest.approx(_reference_loss(model, x, group_count(len(x))),
                                         rel=1e-3)
    again = inverted_inputs(model, steps=150)
    np.testing.assert_array_equal(again.feed["x"], x)  # deterministic


def test_cache_returns_the_same_fit(monkeypatch):
    model = residual_net()
    first = cached_inverted_inputs(model, steps=2)
    monkeypatch.setattr(inversion, "inverted_inputs",
                        lambda *a, **k: pytest.fail("recomputed a cached fit"))
    assert cached_inverted_inputs(model, steps=2) is first


def test_digits_model_inverts_through_maxpool(digits_model):
    from onnx_udfc.core import normalize

    model = onnx.load(digits_model)
    normalize.normalize(model)
    fit = inverted_inputs(model, steps=60)
    assert fit.stopped == [] and fit.batchnorms > 0
    assert fit.loss_end < 0.3 * fit.loss_start
    # the classifier head (Flatten, Gemm) carries the class prior's gradient
    assert fit.class_prior and fit.groups == group_count(len(fit.feed["input"]))
    assert fit.summary()["class_prior"] is True


@pytest.mark.slow
def test_compress_uses_the_inverted_batch_everywhere(digits_model, monkeypatch):
    import onnx_udfc.moments.sampled as synthetic

    # pink noise starts the fit, once; neither the moments nor the sequential fit may then
    # fall back to it
    original, calls = synthetic.synthetic_inputs, []

    def once(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            pytest.fail("pink noise used with --moments inverted")
        return original(*a, **k)
    monkeypatch.setattr(synthetic, "synthetic_inputs", once)
    model, report = api.compress(str(digits_model), prune=0.3, bits=4, method="udfc+",
                                 moments="inverted", sequential=True, target="fake")
    onnx.checker.check_model(model, full_check=True)
    assert report.inversion["steps"] == inversion.STEPS
    assert report.inversion["loss_end"] < report.inversion["loss_start"]
    assert "moments" in report.timings
    assert "invert" in report.summary()
    assert report.to_dict()["inversion"]["batchnorms"] > 0
    comp = compensations(report)
    assert comp and all(c["compensated"] for c in comp.values())


def test_calibration_skips_the_inversion(digits_model, tmp_path, monkeypatch):
    monkeypatch.setattr(inversion, "cached_inverted_inputs",
                        lambda *a, **k: pytest.fail("inverted despite calibration data"))
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    model = onnx.load(digits_model)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).normal(size=(16, *shape[1:])).astype(np.float32)
    _, report = api.compress(str(digits_model), prune=0.3, method="udfc+",
                             moments="inverted", calibration=x, target="fake")
    assert report.inversion is None


def test_cli_inverted_moments_writes_the_fit_to_the_report(digits_model, tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, "compress", str(digits_model), "-o", str(out), "--prune",
                            "0.3", "--method", "udfc+", "--moments", "inverted", "--report",
                            str(rep), "--no-verify", "--target", "fake")
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    fit = json.loads(rep.read_text())["inversion"]
    assert fit["steps"] == inversion.STEPS and fit["class_prior"] is True
    assert fit["groups"] == group_count(synthetic.sample_count([1, 1, 8, 8]))
    line = next(ln for ln in stdout.splitlines() if ln.startswith("invert  "))
    assert "+ class prior" in line and f"{fit['groups']} group(s)" in line


def test_cli_inverted_moments_on_a_model_without_batchnorm_fails_cleanly(tmp_path, capsys):
    src = tmp_path / "nobn.onnx"
    onnx.save(_without_batchnorm(residual_net()), src)
    assert_refused(capsys, tmp_path / "out.onnx", "BatchNormalization", "compress", str(src),
                   "--prune", "0.3", "--method", "udfc+", "--moments", "inverted", "--no-verify",
                       "--target", "fake")


def test_progress_detail_is_silent_off_a_tty(capsys):
    p = Progress(["load", "invert"])
    p("load")
    p.detail("invert 5/300")
    p.close()
    assert capsys.readouterr().err == ""
