"""Nothing is left out silently: weight layers kept in float are listed with their reason,
shared weights stay shared (or the copy is reported), and udfc+ feeds every kind of graph
input without ONNX Runtime writing to the terminal (issue 15, items 3, 5 and 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.moments.sampled import synthetic_inputs
from onnx_udfc.moments.source import MomentSource
from tests.helpers import (
    ROOT,
    Builder,
    bn_relu_convs,
    compensations,
    float_corner_layers,
    image,
    initializers,
    node,
    quantizations,
    shared_weight_convs,
    weight_input_gemm,
)

V_SHAPE = {"v": [8, 2]}  # float_corner_layers' input with a free axis that is not the batch


def _onnx_udfc(*args: str) -> subprocess.CompletedProcess:
    """The command line as a real process: ONNX Runtime logs to the C-level stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "onnx_udfc", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


# -- item 3: every weight layer is quantized, or listed with why not -----------------------------
def test_every_float_weight_layer_is_listed_with_its_reason():
    _, report = api.compress(float_corner_layers(), method="udfc", quant_exclude=["^c3$"],
                             input_shapes=V_SHAPE, float_share=0.0)
    reasons = {f["node"]: f["reason"] for f in report.float_layers}
    assert reasons == {
        "branch_conv": "inside the then_branch of the If 'if1': subgraphs are not quantized",
        "c3": "excluded by the pattern '^c3$' (--exclude / --quant-exclude)",
        "mm": "MatMul with the constant weight as first operand: layout not supported",
        "fc_t": "Gemm with transA=1: layout not supported",
    }
    assert set(quantizations(report)) == {"c1", "c2"}
    line = next(x for x in report.summary().splitlines() if x.startswith("float"))
    assert line.startswith("float   4 weight layers kept in float: ")
    for name, reason in reasons.items():
        assert f"{name} ({reason})" in line
    assert report.to_dict()["float_layers"] == report.float_layers


def test_left_operand_matmul_is_unsupported_for_its_real_reason():
    _, report = api.compress(float_corner_layers(), target="fake", method="prune",
                             input_shapes=V_SHAPE)
    reasons = {u["node"]: u["reason"] for u in report.unsupported}
    assert reasons["mm"] == "MatMul with the constant weight as first operand"
    assert report.float_layers == []  # nothing was quantized, nothing to list


def test_weight_fed_as_graph_input_is_listed():
    _, report = api.compress(weight_input_gemm(), method="udfc")
    assert report.float_layers == [{"node": "fc", "reason": "weight is a graph input"}]
    assert "1 weight layer kept in float: fc (weight is a graph input)" in report.summary()


def test_no_float_line_when_every_weight_layer_is_quantized(digits_model):
    _, report = api.compress(digits_model, method="udfc", bits=8, float_share=0.0)
    assert report.float_layers == []
    assert not any(x.startswith("float") for x in report.summary().splitlines())


# -- item 5: shared weights ----------------------------------------------------------------------
def test_shared_weight_stays_shared_when_readers_keep_the_same_channels():
    model = shared_weight_convs(add=True)
    out, report = api.compress(model, target="fake", method="prune", prune=0.3,
                               prune_coupled=True)
    assert node(out, "left").input[1] == node(out, "right").input[1]
    weights = initializers(out)
    assert weights[node(out, "left").input[1]].shape[0] < 8  # pruned, once
    assert report.params_after < report.params_before
    assert report.duplicated_initializers == []


def test_shared_weight_copy_is_reported_when_readers_keep_different_channels():
    model = shared_weight_convs(add=False)
    # different channels go from the two readers: exclude one of them from pruning
    out, report = api.compress(model, target="fake", method="prune", prune=0.3,
                               exclude=["^right$"])
    left, right = node(out, "left").input[1], node(out, "right").input[1]
    assert left != right
    weights = initializers(out)
    assert weights[right].shape == (8, 4, 3, 3) and weights[left].shape[0] < 8
    [dup] = report.duplicated_initializers
    assert dup["initializer"] == "shared.weight" and dup["copy"] == left
    assert dup["nodes"] == ["left"] and dup["shared_with"] == ["right"]
    assert dup["elements"] == weights[left].size
    assert dup["reason"] == "its readers keep different channels"
    line = next(x for x in report.summary().splitlines() if x.startswith("shared"))
    assert line == (f"shared  1 shared initializer copied (readers keep different channels, "
                    f"+{weights[left].size:,} elements): shared.weight for left")


# -- item 6: every graph input fed, ONNX Runtime silent ------------------------------------------
def test_synthetic_inputs_feed_weights_and_flags_from_their_static_shape():
    feed = synthetic_inputs(weight_input_gemm())
    assert feed["x"].shape == (128, 3, 8, 8)
    assert feed["fc.weight"].shape == (8, 4)  # a weight: its own shape, no sample axis
    assert 0 < float(np.std(feed["fc.weight"])) < 1
    feed = synthetic_inputs(float_corner_layers())
    assert feed["flag"].dtype == np.bool_ and feed["flag"].shape == ()
    assert "v" not in feed  # no static shape apart from the batch: cannot be drawn


def test_udfc_plus_samples_with_a_weight_input():
    _, report = api.compress(weight_input_gemm(), prune=0.3)
    assert report.moments["used"] == "sampled" and report.moments["fallbacks"] == []
    assert all(c["compensated"] for c in compensations(report).values())


def test_a_refused_sample_run_is_recorded_as_a_fallback():
    # 'v' [8, N] carries the batch on its second axis: drawn per sample it cannot run.
    _, report = api.compress(float_corner_layers(), prune=0.3, input_shapes=V_SHAPE)
    [fallback] = report.moments["fallbacks"]
    assert fallback["stage"] == "compensate" and "Dimension mismatch" in fallback["cause"]
    assert "fallback in compensate: sampled failed" in report.summary()


def test_udfc_plus_falls_back_with_a_recorded_cause_when_an_input_cannot_be_drawn():
    model = float_corner_layers()
    source = MomentSource(model)  # no working shape for 'v'
    assert source.kind == "sampled"
    shapes = infer_shapes(model, V_SHAPE)
    assert source.moments(model, shapes, ["v"], stage="compensate")
    [fallback] = source.fallbacks
    assert fallback["cause"] == "input 'v' has no static shape apart from the batch"
    assert source.kind == "propagated" and fallback["stage"] == "compensate"


def _baked_batch() -> onnx.ModelProto:
    """c1, c2 on ``x [1, 3, 8, 8]`` -> Reshape to the constant ``[1, 512]`` -> Gemm: a batch
    of samples fails in ONNX Runtime."""
    b = Builder()
    h = bn_relu_convs(b, image(b, batch=1), [8, 8])
    b.output(b.gemm(b.op("Reshape", [h, b.ints([1, 512])], "flat"), 512, 3, name="fc"))
    return b.build()


@pytest.mark.parametrize("build", [weight_input_gemm, _baked_batch])
def test_no_onnx_runtime_log_reaches_the_terminal(tmp_path, build):
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path))
    r = _onnx_udfc("compress", str(path), "-o", str(tmp_path / "o.onnx"), "--prune", "0.3",
                   "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    report = json.loads((tmp_path / "r.json").read_text())
    if build is _baked_batch:  # the batch is refused: sampled one sample at a time
        assert report["moments"] == {"requested": "auto", "used": "sampled", "fallbacks": []}
        comps = [x["compensation"] for x in report["layers"] if x["compensation"]]
        assert comps and all(c["compensated"] for c in comps)


def test_udfc_plus_with_an_if_branch_runs_and_reports(tmp_path):
    path = tmp_path / "m.onnx"
    model = float_corner_layers()
    # drop the input without a static shape: every input can be fed
    keep = [n for n in model.graph.node if n.name != "fc_t"]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for field in (model.graph.input, model.graph.output):
        stale = [i for i, v in enumerate(field) if v.name in ("v", "fc_t")]
        for i in reversed(stale):
            del field[i]
    onnx.save(model, str(path))
    r = _onnx_udfc("compress", str(path), "-o", str(tmp_path / "o.onnx"), "--prune", "0.3",
                   "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["moments"]["used"] == "sampled"
    comps = {x["name"]: x["compensation"] for x in report["layers"] if x["compensation"]}
    assert comps and all(c["compensated"] or c.get("reason") for c in comps.values())
    assert "branch_conv" in r.stdout  # the float-kept branch Conv is named in the summary


def test_sequential_fit_runs_a_baked_batch_one_sample_at_a_time():
    """Without BatchNorms no probe reads batch statistics: the graph that refuses a batch
    (AlexNet's Reshape to [1, -1]) is probed one sample at a time, and the fit runs."""
    b = Builder()
    h = b.relu(b.conv(b.relu(b.conv(image(b, batch=1), 3, 8, name="c1")), 8, 8, name="c2"))
    b.output(b.gemm(b.op("Reshape", [h, b.ints([1, 512])], "flat"), 512, 3, name="fc"))
    _, report = api.compress(b.build(), prune=0.3, sequential=True, target="fake")
    # (the class prior's fit of the photographs runs a batch: refused, named apart)
    assert not [f for f in report.moments["fallbacks"] if f["from"] == "sequential"]
    comps = compensations(report)
    assert comps and all(c["compensated"] and c["stats"] == "sequential"
                         for c in comps.values()), comps


def test_refused_sequential_fit_falls_back_to_the_one_shot_fit():
    _, report = api.compress(_baked_batch(), prune=0.3, sequential=True)
    # auto fits the pink noise to the BN first (a batch of 128, refused too), then the fit's run
    fitting, fallback = report.moments["fallbacks"]
    assert (fitting["from"], fitting["to"]) == ("sampled with model inversion", "sampled")
    assert fallback["from"] == "sequential" and fallback["stage"] == "compensate"
    assert "Reshape" in fallback["cause"]
    comps = compensations(report)
    assert comps and all(c["compensated"] and c["stats"] == "moments" for c in comps.values())
    assert "fallback in compensate: sequential failed" in report.summary()
