"""udfc+ parts beyond the moment model: reconstruction-based channel selection (select),
synthetic BN-anchored sampling (synthetic), the sequential fit (sequential) and GPTQ wiring."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_udfc import api
from onnx_udfc.channels.select import greedy_removal
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.core.ort import session
from onnx_udfc.methods.sequential import batch_statistics, frozen
from onnx_udfc.moments.sampled import pink_noise, sampled_moments, training_batchnorm
from tests.helpers import (
    assert_refused,
    bn_chain,
    cli,
    compensations,
    conv_bn_relu_model,
    initializers,
    quantizations,
    random_feeds,
    run,
)


def _schur_error(cov: np.ndarray, gram: np.ndarray, pruned: list[int]) -> float:
    kept = [i for i in range(len(cov)) if i not in pruned]
    s = cov[np.ix_(pruned, pruned)]
    if kept:
        s = s - cov[np.ix_(pruned, kept)] @ np.linalg.solve(cov[np.ix_(kept, kept)],
                                                             cov[np.ix_(kept, pruned)])
    return float(np.trace(gram[np.ix_(pruned, pruned)] @ s))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_removal_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(7, 10))
    cov = a @ a.T
    b = rng.normal(size=(7, 4))
    gram = b @ b.T + 0.1 * np.eye(7)
    order, err = greedy_removal(cov, gram, ridge=0.0)
    assert sorted(order.tolist()) == list(range(7))
    chosen: list[int] = []
    for k in range(7):
        best = min((j for j in range(7) if j not in chosen),
                   key=lambda j: _schur_error(cov, gram, chosen + [j]))
        chosen.append(best)
        assert order[k] == best
        assert err[k] == pytest.approx(_schur_error(cov, gram, chosen), rel=1e-6, abs=1e-9)
    assert err[-1] == pytest.approx(np.trace(gram @ cov), rel=1e-9)


def test_greedy_removes_the_reconstructable_channel_not_the_small_one():
    # channel 2 is the largest and 0, 1, 2 are linearly dependent; channel 3 is small and
    # independent: l1 would prune 3 (losing all of it), this order prunes one of 0-2 for free
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 4)) * np.array([1.0, 1.0, 1.0, 0.2])
    x[:, 2] = 2.0 * x[:, 0] - 1.5 * x[:, 1]
    cov = np.cov(x.T)
    order, err = greedy_removal(cov, np.eye(4), ridge=0.0)
    assert order[0] in (0, 1, 2)
    assert err[0] < 1e-6 * np.trace(cov)
    assert _schur_error(cov, np.eye(4), [3]) > 0.03


def test_recon_criterion_plans_and_compresses():
    model = bn_chain()
    out, report = api.compress(model, prune=0.2, method="udfc+", criterion="recon", target="fake")
    onnx.checker.check_model(out, full_check=True)
    assert report.params_after < report.params_before
    with pytest.raises(UdfcError, match="criterion"):
        api.compress(model, prune=0.2, criterion="l3", target="fake", method="prune")


def test_pink_noise_is_standardised_and_smooth():
    x = pink_noise((16, 3, 32, 32), np.random.default_rng(0))
    assert np.allclose(x.mean((0, 2, 3)), 0, atol=1e-9)
    assert np.allclose(x.std((0, 2, 3)), 1, atol=1e-9)
    neighbour = np.mean(x[..., 1:] * x[..., :-1])
    white = np.random.default_rng(1).standard_normal(x.shape)
    assert neighbour > 0.5 > abs(np.mean(white[..., 1:] * white[..., :-1])) + 0.4
    colour = np.mean(x[:, 0] * x[:, 1])
    assert 0.6 < colour < 0.95


@pytest.mark.parametrize("opset", [13, 18])
def test_sampled_bn_outputs_have_the_running_marginals(opset):
    # the BN's own running statistics (mean 0, var 1) are nothing like the inputs' (conv of
    # pink noise): re-anchored, its output still has mean beta and spread |gamma|
    model = conv_bn_relu_model(opset)
    shapes = infer_shapes(model)
    probe = training_batchnorm(model, shapes)
    onnx.checker.check_model(probe, full_check=True)
    m = sampled_moments(model, ["n"], shapes)["n"]
    gamma = numpy_helper.to_array(model.graph.initializer[1])
    beta = numpy_helper.to_array(model.graph.initializer[2])
    # exact on the batch; the covariance reads an even stride of its positions
    assert np.allclose(m.mean, beta, atol=0.03 * np.abs(gamma).max())
    assert np.allclose(np.sqrt(np.diag(m.cov)), np.abs(gamma), rtol=0.03)
    assert not m.diagonal  # cross-channel covariances come from the samples


def test_frozen_statistics_reproduce_training_mode():
    model = bn_chain()
    shapes = infer_shapes(model)
    feeds = random_feeds(model, batch=2, seed=3)
    stats = batch_statistics(model, feeds, shapes)
    assert set(stats) == {"n1"}
    train = run(training_batchnorm(model, shapes), feeds)[0]
    assert np.allclose(run(frozen(model, model, stats), feeds)[0], train, atol=1e-4)


def test_sequential_needs_udfc_plus():
    with pytest.raises(UdfcError, match="sequential"):
        api.compress(bn_chain(), prune=0.2, method="udfc", sequential=True, target="fake")


def _images(npz) -> np.ndarray:
    data = np.load(npz)
    name = next(k for k in data.files if k != "labels")
    return data[name].astype(np.float32)


def _digits_error(digits_model, digits_data) -> tuple[np.ndarray, Callable[..., float]]:
    """The digits test images, and the mean squared output error of a model against the
    original digits model on them."""
    x = _images(digits_data)
    sess = session(digits_model)
    feed = {sess.get_inputs()[0].name: x}
    ref = sess.run(None, feed)[0]
    return x, lambda model: float(np.mean((session(model).run(None, feed)[0] - ref) ** 2))


@pytest.mark.parametrize("criterion", ["l1", "recon"])
def test_sequential_fit_beats_per_layer_fit_with_calibration(digits_model, digits_data,
                                                            criterion):
    x, error = _digits_error(digits_model, digits_data)
    errs = {}
    for seq in (False, True):
        out, report = api.compress(digits_model, prune=0.5, method="udfc+", criterion=criterion,
                                   calibration=x, sequential=seq, target="fake")
        onnx.checker.check_model(out, full_check=True)
        layers = compensations(report)
        assert layers and all(c["compensated"] for c in layers.values())
        errs[seq] = error(out)
    assert errs[True] < errs[False]


def test_data_free_sequential_runs_and_reports(digits_model):
    out, report = api.compress(digits_model, prune=0.4, method="udfc+", sequential=True,
        target="fake")
    onnx.checker.check_model(out, full_check=True)
    assert {c.get("stats") for c in compensations(report).values()} == {"sequential"}


@pytest.mark.parametrize("quantizer", ["paper", "symmetric"])
def test_gptq_weights_lie_on_the_grid_and_beat_rounding(digits_model, digits_data, quantizer):
    _, error = _digits_error(digits_model, digits_data)
    errs = {}
    for method in ("prune", "udfc+"):
        out, report = api.compress(digits_model, bits=3, method=method, quantizer=quantizer,
            target="fake")
        errs[method] = error(out)
        if method == "udfc+":
            assert any(q.get("gptq") for q in quantizations(report).values())
            inits = initializers(out)
            for node in out.graph.node:
                if node.op_type in ("Conv", "Gemm"):  # per-tensor grids: at most 2^3 levels
                    assert len(np.unique(inits[node.input[1]])) <= 2 ** 3
    assert errs["udfc+"] < errs["prune"]


def test_gptq_qdq_twin_matches_fake(digits_model, digits_data):
    fake, _ = api.compress(digits_model, bits=4, method="udfc+", quantizer="symmetric",
                           granularity="channel", target="fake")
    qdq, _ = api.compress(digits_model, bits=4, method="udfc+", quantizer="symmetric",
                          granularity="channel", format="qdq", target="fake")
    x = _images(digits_data)[:64]
    a = session(fake).run(None, {session(fake).get_inputs()[0].name: x})[0]
    b = session(qdq).run(None, {session(qdq).get_inputs()[0].name: x})[0]
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("args", [["--criterion", "recon", "--prune", "0.4"],
                                  ["--prune", "0.4", "--sequential"],
                                  ["--prune", "0.4", "--moments", "propagated", "--bits", "4"],
                                  ["--criterion", "recon", "--budget-flops", "0.7"]])
def test_cli_options(capsys, tmp_path, digits_model, args):
    dst = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "compress", str(digits_model), "-o", str(dst), "--method", "udfc+",
                       *args, "--report", str(tmp_path / "r.json"), "-q", "--target", "fake")
    assert code == 0 and dst.exists(), err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params_after"] < report["params_before"]


def test_cli_rejects_sequential_without_udfc_plus(tmp_path, digits_model, capsys):
    assert_refused(capsys, tmp_path / "o.onnx", "sequential", "compress", str(digits_model),
                   "--prune", "0.3", "--method", "udfc", "--sequential", "--target", "fake")
