"""The real pretrained models in ../shared analyse, prune, pass the checker and run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.core.ort import make_inputs, run, session
from onnx_udfc.report.verify import compare
from tests.helpers import analysed, removed_channels

MODELS = ["resnet20_cifar10_bn", "resnet20_cifar10_folded", "resnet56_cifar10_nm_bn",
          "resnet56_cifar10_nm_folded", "resnet56_cifar10_bn", "lenet300100_fashionmnist_nm"]


def _outputs(model, feed):
    return run(session(model), feed)


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_is_identity(shared_model, name):
    path = shared_model(name)
    model, report = api.compress(str(path), prune=0.0, target="fake", method="prune")
    feed, _ = make_inputs(onnx.load(str(path)), batch=4)
    fid = compare(_outputs(str(path), feed), _outputs(model, feed), ["out"])[0]
    assert fid.max_abs < 1e-6
    assert report.params_after == report.params_before


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_prune_real_models(shared_model, name, ratio):
    path = shared_model(name)
    model, report = api.compress(str(path), prune=ratio, target="fake", method="prune")
    onnx.checker.check_model(model, full_check=True)
    feed, _ = make_inputs(onnx.load(str(path)), batch=2)
    out = _outputs(model, feed)[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    # Block-internal channels (or LeNet's hidden layers) go; residual stages stay by default.
    removed = removed_channels(report)
    prunable = [g for g in report.groups if g["prunable"]]
    expected = sum(int(np.floor(ratio * g["channels"] + 0.5)) for g in prunable)
    assert removed == expected > 0
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    for g in report.groups:
        if g["coupled"]:
            assert g["removed"] == 0 and any("residual" in r for r in g["fixed_reasons"])


EXPECTED_GROUPS = {
    # name: (groups, coupled groups, prunable block-internal groups)
    "resnet20_cifar10_bn": (11, 1, 9),
    "resnet56_cifar10_nm_bn": (31, 3, 27),
    "resnet56_cifar10_nm_folded": (31, 3, 27),
    "lenet300100_fashionmnist_nm": (3, 0, 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_GROUPS))
def test_group_structure(shared_model, name):
    groups = analysed(api.load(shared_model(name))).groups
    n, coupled, internal = EXPECTED_GROUPS[name]
    assert len(groups) == n
    assert sum(g.coupled for g in groups) == coupled
    assert sum(1 for g in groups if not g.coupled and g.prunable == g.size) == internal


def test_resnet20_option_a_shortcut_couples_all_stages(shared_model):
    """The zero-padded shortcut ties stage 1's 16 channels into stage 2 and 3 (64 classes)."""
    coupled = [g for g in analysed(api.load(shared_model("resnet20_cifar10_bn"))).groups
               if g.coupled]
    assert len(coupled) == 1 and coupled[0].size == 64 and coupled[0].prunable == 64
    assert len(coupled[0].producers) == 10  # stem conv + 9 blocks' second convs


@pytest.mark.parametrize("name", ["resnet20_cifar10_bn", "resnet56_cifar10_nm_folded"])
def test_prune_coupled_residual_stages(shared_model, name):
    path = shared_model(name)
    model, report = api.compress(str(path), prune=0.5, prune_coupled=True,
        target="fake", method="prune")
    onnx.checker.check_model(model, full_check=True)
    assert all(g["removed"] > 0 for g in report.groups if g["coupled"])
    feed, _ = make_inputs(onnx.load(str(path)), batch=2)
    assert _outputs(model, feed)[0].shape == (2, 10)
    plain = api.compress(str(path), prune=0.5, target="fake", method="prune")[1]
    assert report.params_after < plain.params_after


def test_lenet_parameters_lost_exactly(shared_model):
    """784-300-100-10 at 50%: 150 and 50 hidden neurons remain."""
    model, report = api.compress(str(shared_model("lenet300100_fashionmnist_nm")),
                                 prune=0.5, target="fake", method="prune")
    expected = 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    assert report.params_after == expected
    shapes = sorted(tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2)
    assert shapes == sorted([(150, 784), (50, 150), (10, 50)]) or \
        shapes == sorted([(784, 150), (150, 50), (50, 10)])


def test_fold_batchnorm_keeps_outputs_and_stats(shared_model):
    path = shared_model("resnet56_cifar10_nm_bn")
    model = api.load(path)
    api.normalize(model)
    stats = api.fold_batchnorm(model)
    assert len(stats) == 57
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    first = next(iter(stats.values()))
    assert first.gamma.shape == first.var.shape and first.eps > 0
    onnx.checker.check_model(model, full_check=True)
    feed, _ = make_inputs(onnx.load(str(path)), batch=4)
    fid = compare(_outputs(str(path), feed), _outputs(model, feed), ["out"])[0]
    assert fid.max_abs < 1e-3 and fid.cosine > 0.999999


def test_zero_filters_removed_exactly(shared_model):
    """Zeroing the lowest-l1 filters of block-internal convs (and their BN so the channel
    output is exactly zero) then pruning exactly those leaves the outputs unchanged."""
    from onnx_udfc.core.io import set_tensor_array, tensor_array

    path = shared_model("resnet56_cifar10_nm_bn")
    model = api.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    for i, node in enumerate(nodes):
        if node.op_type != "Conv" or "conv1" not in node.name:
            continue
        bn = nodes[i + 1]
        assert bn.op_type == "BatchNormalization"
        w = tensor_array(inits[node.input[1]]).copy()
        zero = np.arange(0, w.shape[0], 2)  # exactly 50%
        w[zero] = 0.0
        set_tensor_array(inits[node.input[1]], w)
        beta = tensor_array(inits[bn.input[2]]).copy()
        beta[zero] = 0.0
        mean = tensor_array(inits[bn.input[3]]).copy()
        mean[zero] = 0.0
        set_tensor_array(inits[bn.input[2]], beta)
        set_tensor_array(inits[bn.input[3]], mean)
    pruned, report = api.compress(model, prune=0.5, target="fake", method="prune")
    assert removed_channels(report) == sum(
        g["channels"] // 2 for g in report.groups if not g["coupled"] and g["prunable"])
    feed, _ = make_inputs(model, batch=4)
    fid = compare(_outputs(model, feed), _outputs(pruned, feed), ["out"])[0]
    assert fid.max_abs < 1e-4
