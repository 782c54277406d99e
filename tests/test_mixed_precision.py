"""--budget-size: per-layer 8/4-bit or float under a file-size budget, allocated by each
layer's measured effect on the outputs (onnx_udfc.methods.mixed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.config import CompressConfig
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.moments import drift
from onnx_udfc.outputs import backoff_plans
from tests.helpers import Builder, assert_refused, cli, run


def twin_layers(outlier: bool = True) -> onnx.ModelProto:
    """Two equal-size 1x1 convs; ``sharp`` has one huge weight per filter, on a channel that
    is always zero, so that 4-bit per-channel rounding flattens the weights that matter."""
    b = Builder(seed=11)
    x = b.input("x", ["N", 128, 4, 4])
    h = b.relu(b.conv(x, 128, 128, k=1, name="plain"))
    b.output(b.conv(h, 128, 128, k=1, name="sharp"))
    model = b.build()
    if outlier:
        inits = {t.name: t for t in model.graph.initializer}

        def edit(name: str, change) -> None:
            arr = onnx.numpy_helper.to_array(inits[name]).copy()
            change(arr)
            inits[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
        edit("plain.weight", lambda a: a.__setitem__(0, 0.0))  # channel 0: relu(-1) = 0
        edit("plain.bias", lambda a: a.__setitem__(0, -1.0))
        edit("sharp.weight", lambda a: a.__setitem__((slice(None), 0), 40.0 * np.abs(a).max()))
    return model


def test_the_sensitive_layer_keeps_more_bits():
    model = twin_layers()
    # One layer at 4 bits and the other at 8 fits (0.23x); both at 8 (0.29x) does not.
    out, report = api.compress(model, budget_size=0.25, method="prune")
    plan = report.mixed_precision
    assert plan["layers"]["sharp"]["error_at_4_bits"] > 10 * plan["layers"]["plain"][
        "error_at_4_bits"]
    assert plan["layers"]["plain"]["bits"] == 4 and plan["layers"]["sharp"]["bits"] == 8
    assert plan["predicted_size"] <= 0.25 * report.size_before
    assert report.size_after <= 0.25 * report.size_before
    assert "output drift measured on" in plan["sensitivity"]
    bits = {q["storage"]["dtype"] for q in report.storage["layers"].values()} \
        if "layers" in (report.storage or {}) else None
    assert bits is None or bits == {"int4", "int8"}
    x = np.random.default_rng(0).standard_normal((4, 128, 4, 4)).astype(np.float32)
    assert run(out, {"x": x})[0].shape == (4, 128, 4, 4)
    assert "budget  size <= 0.25x: 1 4-bit, 1 8-bit" in report.summary()


def test_a_loose_budget_leaves_the_costliest_layer_in_float():
    _, report = api.compress(twin_layers(), budget_size=0.7, method="prune")
    assert report.mixed_precision["layers"]["sharp"]["bits"] is None
    assert any(f["node"] == "sharp" and "--budget-size" in f["reason"]
               for f in report.float_layers)


def test_digits_end_to_end(capfd, tmp_path, digits_model, digits_data):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--data",
                            str(digits_data), "--budget-size", "0.2", "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert out.stat().st_size <= 0.2 * digits_model.stat().st_size
    assert report["storage"]["opset_after"] >= 21  # int4 DequantizeLinear
    assert set(report["mixed_precision"]["counts"]) == {"4-bit", "8-bit"}
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.01
    assert "guard   ok" in stdout


def test_unreachable_budget_is_one_line(capfd, tmp_path, digits_model):
    assert_refused(capfd, tmp_path / "o.onnx", "cannot be met by quantization alone",
                   "compress", str(digits_model), "--budget-size", "0.05", "--no-verify")


@pytest.mark.parametrize("args,needle", [
    (["--budget-size", "0"], "must be in (0, 1]"),
    (["--budget-size", "1.5"], "must be in (0, 1]"),
    (["--budget-size", "0.3", "--target", "fake"], "counts integer storage"),
    (["--budget-size", "0.3", "--bits", "6"], "drop --bits"),
    (["--budget-size", "0.3", "--container", "int4"], "drop --container int4"),
])
def test_bad_budget_refused(capfd, tmp_path, digits_model, args, needle):
    assert_refused(capfd, tmp_path / "o.onnx", needle, "compress", str(digits_model), *args)


def test_weight_error_stands_in_when_the_network_cannot_run(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise UdfcError("ONNX Runtime cannot run the model")

    monkeypatch.setattr(drift, "session", refuse)
    _, report = api.compress(twin_layers(), budget_size=0.25, method="prune")
    plan = report.mixed_precision
    assert plan["sensitivity"].startswith("weight rounding error (the network could not run")
    # The weight's own error misses that the outlier sits on a dead channel: measuring the
    # outputs is what tells the layers apart (test_the_sensitive_layer_keeps_more_bits).
    assert plan["counts"] == {"4-bit": 1, "8-bit": 1}
    assert report.size_after <= 0.25 * report.size_before
    assert "weight rounding error" in report.summary()


def test_guard_backs_off_to_8_bits_without_the_budget():
    config = CompressConfig.resolve(prune=0.2, budget_size=0.2)
    plans = backoff_plans(config)
    assert [p.quant.budget_size for p in plans][:-1] == [0.2] * (len(plans) - 1)
    assert plans[-1].quant.budget_size is None and plans[-1].quant.bits == 8 \
        and plans[-1].prune.ratio == 0.0


# -- --float-share: one integer width, the most sensitive layers kept in float --------------------
def test_float_share_keeps_the_sensitive_layer_in_float():
    # One float copy (3 bytes more per weight than int8: 0.37x the original) fits 0.4x.
    out, report = api.compress(twin_layers(), float_share=0.4, method="prune")
    plan = report.mixed_precision
    assert plan["float_share"] == 0.4 and plan["budget_size"] is None
    assert plan["layers"]["sharp"]["bits"] is None and plan["layers"]["plain"]["bits"] == 8
    assert [f["node"] for f in report.float_layers] == ["sharp"]
    assert "--float-share" in report.float_layers[0]["reason"]
    assert "share   1 layer(s) kept in float within --float-share 0.4" in report.summary()
    assert report.size_after <= plan["predicted_size"] * 1.05
    x = np.random.default_rng(0).standard_normal((4, 128, 4, 4)).astype(np.float32)
    reference = run(twin_layers(), {"x": x})[0]
    rounded, _ = api.compress(twin_layers(), float_share=0.0, method="prune")
    # Keeping the outlier layer in float is what makes the output closer.
    assert np.abs(run(out, {"x": x})[0] - reference).mean() < \
        np.abs(run(rounded, {"x": x})[0] - reference).mean()


def test_a_share_no_layer_fits_measures_nothing_and_changes_nothing():
    # 3 % of the file is less than either layer's float copy: both at 8 bits, as without it.
    out, report = api.compress(twin_layers(), float_share=0.03, method="prune")
    plan = report.mixed_precision
    assert plan["counts"] == {"8-bit": 2}
    assert plan["sensitivity"].startswith("not measured")
    assert all(layer["error_at_4_bits"] is None for layer in plan["layers"].values())
    plain, _ = api.compress(twin_layers(), float_share=0.0, method="prune")
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in out.graph.initializer] == \
        [onnx.numpy_helper.to_array(t).tobytes() for t in plain.graph.initializer]


@pytest.mark.parametrize("preset,target,share", [
    ("balanced", "int8", 0.03), ("balanced", "int4", 0.03), ("best", "int8", 0.03),
    ("fast", "int8", 0.0), ("paper", None, 0.0), ("balanced", "fake", 0.0)])
def test_recommended_presets_keep_a_float_share_of_integer_targets(preset, target, share):
    from onnx_udfc.config import FLOAT_SHARE

    config = CompressConfig.resolve(preset, target)
    assert config.quant.float_share == (FLOAT_SHARE if share else 0.0)
    assert CompressConfig.resolve(preset, target, budget_size=0.2).quant.float_share == 0.0 \
        or target in ("fake", None)


@pytest.mark.parametrize("target", ["int8", "int4"])
def test_a_size_budget_rounds_on_a_grid_with_a_zero_point(target):
    """Most of a budget's layers go to 4 bits, where a symmetric grid wastes half its levels
    on a skewed channel: the budget uses the asymmetric grid unless --quantizer is given."""
    assert CompressConfig.resolve(target=target).quant.quantizer == "symmetric"
    assert CompressConfig.resolve(target=target, budget_size=0.2).quant.quantizer == \
        "asymmetric"
    assert CompressConfig.resolve(target=target, budget_size=0.2,
                                  quantizer="symmetric").quant.quantizer == "symmetric"
    _, report = api.compress(twin_layers(), target=target, budget_size=0.5, method="prune")
    assert report.config["quant"]["quantizer"] == "asymmetric"


@pytest.mark.parametrize("args,needle", [
    (["--float-share", "1"], "must be in [0, 1)"),
    (["--float-share", "-0.1"], "must be in [0, 1)"),
    (["--float-share", "0.1", "--target", "fake"], "counts integer storage"),
    (["--float-share", "0.1", "--budget-size", "0.3"], "drop --float-share"),
])
def test_bad_float_share_refused(capfd, tmp_path, digits_model, args, needle):
    assert_refused(capfd, tmp_path / "o.onnx", needle, "compress", str(digits_model), *args)
