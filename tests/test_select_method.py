"""--select-method (the best and max presets): with pruning, the sequential udfc+ fit and the
one-shot one each compress the model, and the one whose outputs drift least on pink noise and
photographs is kept (onnx_udfc.methods.select)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_udfc import api, pipeline
from onnx_udfc.config import CompressConfig
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.methods import select
from tests.helpers import assert_refused, cli


def _weights(model: onnx.ModelProto) -> list[bytes]:
    return [onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]


def test_best_runs_each_candidate_and_keeps_the_least_drift(digits_model):
    out, report = api.compress(str(digits_model), preset="best", prune=0.3)
    sel = report.selection
    assert [c["method"] for c in sel["candidates"]] == ["udfc+ --sequential", "udfc+"]
    errors = [c["error"] for c in sel["candidates"]]
    chosen = int(np.argmin(errors))
    assert sel["chosen"] == sel["candidates"][chosen]["method"]
    assert [c["chosen"] for c in sel["candidates"]] == [i == chosen for i in range(2)]
    assert sel["skipped"] is None and "pink noise and photographs" in sel["inputs"]
    assert f"select  kept {sel['chosen']}, the least output drift" in report.summary()
    assert report.timings["select"] > 0
    # The kept model is the chosen method's own result, option for option.
    alone, _ = api.compress(str(digits_model), preset="best", prune=0.3, select=False,
                            sequential="--sequential" in sel["chosen"])
    assert _weights(out) == _weights(alone)


def test_the_kept_model_follows_the_comparison(monkeypatch, digits_model):
    # Scripted errors: the one-shot fit drifts least, so its model and report come back.
    errors = iter([3.0, 2.0])
    monkeypatch.setattr(select.Judge, "error", lambda self, model: next(errors))
    out, report = api.compress(str(digits_model), preset="best", prune=0.3)
    assert report.selection["chosen"] == "udfc+"
    one_shot, one_shot_report = api.compress(str(digits_model), preset="best", prune=0.3,
                                             sequential=False)
    assert one_shot_report.selection is None
    assert _weights(out) == _weights(one_shot)
    assert [x.get("compensation") for x in report.layers] == \
        [x.get("compensation") for x in one_shot_report.layers]


def test_no_comparison_keeps_the_configured_run_and_says_why(monkeypatch, digits_model):
    def refuse(*_args, **_kwargs):
        raise UdfcError("ONNX Runtime cannot load the model: test")

    monkeypatch.setattr(select, "session", refuse)
    out, report = api.compress(str(digits_model), preset="best", prune=0.3)
    sel = report.selection
    assert [c["method"] for c in sel["candidates"]] == ["udfc+ --sequential"]
    assert sel["chosen"] == "udfc+ --sequential" and "cannot load" in sel["skipped"]
    assert "could not be compared" in report.summary()
    alone, _ = api.compress(str(digits_model), preset="best", prune=0.3, select=False)
    assert _weights(out) == _weights(alone)


def test_without_pruning_nothing_is_selected(digits_model):
    _, report = api.compress(str(digits_model), preset="best")
    assert report.selection is None
    config = CompressConfig.resolve("best", prune=0.2)
    assert "select" in pipeline.stage_names(config)
    assert "select" not in pipeline.stage_names(CompressConfig.resolve("best"))
    assert pipeline.stage_names(config, with_outputs=True).index("select") < \
        pipeline.stage_names(config, with_outputs=True).index("save")


@pytest.mark.parametrize("preset,options,expected", [
    ("best", {}, True), ("max", {}, True), ("balanced", {}, False),
    ("best", {"method": "udfc"}, False), ("best", {"sequential": False}, False),
    ("fast", {}, False)])
def test_presets_select_for_the_sequential_fit_only(preset, options, expected):
    assert CompressConfig.resolve(preset, **options).method.select is expected


@pytest.mark.parametrize("args", [["--method", "udfc"], ["--method", "udfc+"]])
def test_select_without_the_sequential_fit_is_refused(capfd, tmp_path, digits_model, args):
    assert_refused(capfd, tmp_path / "o.onnx", "give --method udfc+ --sequential",
                   "compress", str(digits_model), *args, "--select-method")


def test_command_line_report_names_the_candidates(capfd, tmp_path, digits_model):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--preset",
                            "best", "--prune", "0.2", "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert len(report["selection"]["candidates"]) == 2
    assert "select  kept" in stdout and "guard" in stdout


def test_calibration_inputs_are_the_comparison(digits_model, digits_data):
    x = np.load(digits_data)
    images = x[[k for k in x.files if k != "labels"][0]][:40]
    _, report = api.compress(str(digits_model), preset="best", prune=0.3, calibration=images)
    assert report.selection["inputs"] == "40 samples each of the --calibration inputs"
    assert all(c["error"] is not None for c in report.selection["candidates"])


def test_the_candidates_share_one_float_share_measurement(monkeypatch, digits_model):
    """Both fits prune the same channels: the layers' drifts are measured once, for the first
    candidate, and the second reads them (the report says so)."""
    from onnx_udfc.methods import mixed

    measured: list[int] = []
    real = mixed.DriftProbe

    def probe(model, weights, source):
        weights = list(weights)
        measured.append(len(weights))
        return real(model, weights, source)

    monkeypatch.setattr(mixed, "DriftProbe", probe)
    errors = iter([3.0, 2.0])  # the second candidate is kept: its report is the one read
    monkeypatch.setattr(select.Judge, "error", lambda self, model: next(errors))
    _, report = api.compress(str(digits_model), preset="best", prune=0.3)
    assert report.config["quant"]["float_share"] > 0
    assert len(measured) == 1 and measured[0] > 0
    sensitivity = report.mixed_precision["sensitivity"]
    assert f"{measured[0]} of {measured[0]} layers' drifts reused" in sensitivity, sensitivity
