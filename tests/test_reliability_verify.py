"""What ``verify``, ``evaluate`` and ``inspect`` promise beyond the happy path: float16 models
end to end, a closed pipe, Polygraphy-like tolerances and exit status, bad data refused in one
line, and input shape overrides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from tests.helpers import ROOT, cli, conv_pair, float16_conv_bn, long_named_chain, session


def _save(path: Path, model: onnx.ModelProto) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def _one_error_line(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnx-udfc: error:"), err
    assert needle in lines[0], lines[0]


def _perturbed(model: onnx.ModelProto, name: str, delta: float) -> onnx.ModelProto:
    """A copy of ``model`` with ``delta`` added to the initializer ``name``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + delta, name))
    return out


# -- float16 models ------------------------------------------------------------------------------
@pytest.mark.parametrize("options,used,fit", [(["--sequential"], "sampled", True),
                                              (["--moments", "inverted"], "inverted", False),
                                              (["--moments", "sampled"], "sampled", False)])
def test_float16_model_compresses_without_falling_back(capfd, tmp_path, options, used, fit):
    src = _save(tmp_path / "m.onnx", float16_conv_bn())
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = cli(capfd, "compress", src, "-o", str(out), "--target", "fake",
                       "--prune", "0.5", "--report", str(rep), *options)
    assert code == 0, err
    moments = json.loads(rep.read_text())["moments"]
    assert moments["fallbacks"] == [] and moments["used"] == used
    assert ("fit" in moments) == fit  # auto's short inversion of the noise ran in float32
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float16)
    assert np.isfinite(session(model).run(None, {"x": x})[0]).all()


def test_verify_feeds_float32_data_to_a_float16_model(capfd, tmp_path):
    src = _save(tmp_path / "m.onnx", float16_conv_bn())
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    code, stdout, err = cli(capfd, "verify", src, src, "--data", str(data))
    assert code == 0, err
    assert stdout.startswith("5 samples")


# -- a closed pipe ---------------------------------------------------------------------------------
def test_inspect_into_head_exits_quietly(tmp_path):
    src = _save(tmp_path / "long.onnx", long_named_chain())
    inspect = subprocess.Popen([sys.executable, "-m", "onnx_udfc", "inspect", src],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    head = subprocess.Popen(["head", "-1"], stdin=inspect.stdout, stdout=subprocess.PIPE)
    inspect.stdout.close()  # head holds the only reading end: when it exits, the pipe closes
    first, _ = head.communicate(timeout=120)
    err = inspect.stderr.read().decode()
    code = inspect.wait(timeout=120)
    inspect.stderr.close()
    assert first.decode().startswith(src)
    assert err == "" and code in (0, 141), (code, err)


# -- tolerances and exit status --------------------------------------------------------------------
def test_verify_tolerances_pass_and_fail(capfd, tmp_path):
    model = conv_pair()
    src = _save(tmp_path / "a.onnx", model)
    off = _save(tmp_path / "b.onnx", _perturbed(model, "w2", 0.01))
    code, _, err = cli(capfd, "verify", src, src, "--atol", "0", "--rtol", "0")
    assert code == 0, err
    code, _, err = cli(capfd, "verify", src, off, "--atol", "10")
    assert code == 0, err
    code, stdout, err = cli(capfd, "verify", src, off, "--atol", "1e-4", "--rtol", "1e-3",
                            "--json", str(tmp_path / "v.json"))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("onnx-udfc: mismatch: y:") and "atol 0.0001" in lines[0]
    assert "y: max abs" in stdout  # the measurements are printed as before
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["passed"] is False and len(result["failures"]) == 1


def test_verify_min_agreement(capfd, tmp_path, digits_model):
    model = onnx.load(str(digits_model))
    for t in model.graph.initializer:  # the classes in reverse order: the top-1 class moves
        if t.name in ("fc2.weight", "fc2.bias"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[::-1].copy(), t.name))
    flipped = _save(tmp_path / "flipped.onnx", model)
    assert cli(capfd, "verify", str(digits_model), flipped, "--min-agreement", "0")[0] == 0
    code, _, err = cli(capfd, "verify", str(digits_model), flipped, "--min-agreement", "0.99")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert "logits: top-1 agreement" in lines[0] and "below 99.00%" in lines[0], err
    code, _, err = cli(capfd, "verify", str(digits_model), flipped, "--min-agreement", "1.5")
    _one_error_line(code, err, "--min-agreement")


def test_min_agreement_needs_a_classifier(capfd, tmp_path):
    src = _save(tmp_path / "a.onnx", conv_pair())
    code, _, err = cli(capfd, "verify", src, src, "--min-agreement", "0.9")
    _one_error_line(code, err, "classifier")


# -- bad data and limits ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_refused(capfd, tmp_path, bad):
    src = _save(tmp_path / "a.onnx", conv_pair())
    x = np.zeros((4, 3, 8, 8), np.float32)
    x[2, 1, 3, 3] = bad
    np.savez(tmp_path / "d.npz", x=x)
    code, _, err = cli(capfd, "verify", src, src, "--data", str(tmp_path / "d.npz"))
    _one_error_line(code, err, "NaN or Inf")


@pytest.mark.parametrize("command", ["verify", "evaluate"])
@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one_refused(capfd, digits_model, digits_data, command, limit):
    models = [str(digits_model)] * (2 if command == "verify" else 1)
    code, _, err = cli(capfd, command, *models, "--data", str(digits_data), "--limit", limit)
    _one_error_line(code, err, "--limit")


def test_evaluate_refuses_a_segmentation_output(capfd, tmp_path):
    src = _save(tmp_path / "seg.onnx", conv_pair())
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32),
             labels=np.zeros(4, np.int64))
    code, stdout, err = cli(capfd, "evaluate", src, "--data", str(tmp_path / "d.npz"))
    _one_error_line(code, err, "[N, K]")
    assert "top-1" not in stdout


# -- input shape overrides -------------------------------------------------------------------------
def test_verify_uses_the_input_shape_override(capfd, tmp_path):
    src = _save(tmp_path / "a.onnx", conv_pair(height="H"))
    js = tmp_path / "v.json"
    code, stdout, err = cli(capfd, "verify", src, src, "--input-shape", "x:3x3x12x8",
                            "--json", str(js))
    assert code == 0, err
    assert json.loads(js.read_text())["input_shapes"] == {"x": [3, 3, 12, 8]}
    assert stdout.startswith("3 samples")
    code, _, err = cli(capfd, "verify", src, src, "--input-shape", "x:3x3x12")
    _one_error_line(code, err, "rank")
