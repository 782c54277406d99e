"""--budget-flops: per-group ratios under a global FLOPs budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.channels.budget import allocate, predicted_macs
from onnx_udfc.config import PruneOptions
from onnx_udfc.core.errors import UdfcError
from tests.helpers import Builder, cli, max_diff


def _chain() -> onnx.ModelProto:
    """Conv-BN-ReLU x3 of different widths and resolutions, then GAP and a classifier."""
    b = Builder(seed=3)
    x = b.input("x", [2, 3, 16, 16])
    c = 3
    for i, (w, s) in enumerate([(16, 1), (24, 2), (32, 1)]):
        x = b.relu(b.bn(b.conv(x, c, w, stride=s, bias=False, name=f"conv{i}"), w))
        c = w
    y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), c, 10, trans_b=1,
               name="fc")
    b.output(y)
    return b.build()


@pytest.mark.parametrize("budget", [0.8, 0.5])
def test_budget_is_met_and_cost_model_is_exact(budget):
    model = _chain()
    out, report = api.compress(model, budget_flops=budget, method="udfc+", target="fake")
    d = report.to_dict()
    assert d["flops_after"] <= budget * d["flops_before"]
    assert d["flops_after"] > 0.5 * budget * d["flops_before"]  # not wildly over-pruned
    m = api.load(model)
    api.normalize(m)
    a = api.analyse(m)
    ratios = allocate(a.channels, a.groups, budget, PruneOptions(criterion="l1"))
    assert set(ratios) == {g.id for g in a.groups} and max(ratios.values()) > 0
    p = api.plan(a, 0.0, group_ratios=ratios)
    before, after = predicted_macs(a.channels, p.removed)
    assert 2 * before == d["flops_before"] and 2 * after == d["flops_after"]
    assert np.isfinite(max_diff(model, out))


def test_budget_errors():
    m = _chain()
    api.normalize(m)
    a = api.analyse(m)
    with pytest.raises(UdfcError, match="budget"):
        allocate(a.channels, a.groups, 0.0, PruneOptions())
    with pytest.raises(UdfcError, match="cannot reach"):
        allocate(a.channels, a.groups, 0.01, PruneOptions())


def test_budget_cli(capsys, tmp_path):
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_chain(), src)
    code, _, err = cli(capsys, "compress", str(src), "-o", str(dst), "--budget-flops", "0.7",
                       "--method", "udfc+", "--report", str(tmp_path / "r.json"), "-q",
                           "--target", "fake")
    assert code == 0 and dst.exists(), err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["flops_after"] <= 0.7 * r["flops_before"]


def _one_group_barely_read() -> onnx.ModelProto:
    """``_chain`` whose conv1 reads conv0's channels through weights 1000x smaller than its
    others would be: conv0's group barely moves the outputs, conv1's does."""
    model = _chain()
    w = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1e-3, w.name))
    return model


def _group_ratios(model: onnx.ModelProto, **kwargs) -> tuple[dict[str, float], dict]:
    m = api.load(model)
    api.normalize(m)
    a = api.analyse(m)
    measured: dict = {}
    ratios = allocate(a.channels, a.groups, 0.6, PruneOptions(criterion="l1"),
                      measured=measured, **kwargs)
    return {g.producers[0]: ratios[g.id] for g in a.groups if g.producers}, measured


def test_groups_that_barely_move_the_outputs_are_pruned_first():
    ratios, measured = _group_ratios(_one_group_barely_read())
    assert measured["sensitivity"].startswith("output drift measured on")
    drift = measured["group_drift"]
    assert min(drift.values()) < 1e-3 * max(drift.values())
    assert ratios["conv0"] > ratios["conv1"] and ratios["conv0"] > ratios["conv2"]


def test_group_drift_falls_back_to_the_channel_share_named(monkeypatch):
    from onnx_udfc.moments import drift

    def refuse(*_args, **_kwargs):
        raise UdfcError("ONNX Runtime cannot run the model")

    monkeypatch.setattr(drift, "session", refuse)
    _, measured = _group_ratios(_chain())
    assert measured["group_drift"] == {}
    assert measured["sensitivity"].startswith("channel share only (the network could not run")
