"""``--format qdq`` on the command line: summary, report, and every refusal (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import assert_refused, cli, conv_pair, tool_module

QDQ4 = ["--bits", "4", "--quantizer", "symmetric", "--format", "qdq", "--no-verify"]


def _gemm(path: Path, *, dtype=np.float32, custom_reader: bool = False,
          weight_is_input: bool = False) -> Path:
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    w = np.random.default_rng(0).standard_normal((4, 6)).astype(dtype)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    inputs = [helper.make_tensor_value_info("x", elem, [2, 6])]
    outputs = [helper.make_tensor_value_info("y", elem, [2, 4])]
    opsets = [helper.make_opsetid("", 17)]
    if custom_reader:
        nodes.append(helper.make_node("Foo", ["w"], ["z"], domain="com.example", name="foo"))
        outputs.append(helper.make_tensor_value_info("z", elem, None))
        opsets.append(helper.make_opsetid("com.example", 1))
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w", elem, [4, 6]))
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=opsets), str(path))
    return path


def _mvn_opset9(path: Path) -> Path:
    """Conv -> MeanVarianceNormalization -> Conv at opset 9: onnx's version converter turns
    the MVN into a graph that fails the checker, so no opset upgrade is possible."""
    model = conv_pair(helper.make_node("MeanVarianceNormalization", ["a"], ["b"], name="mvn"),
                      opset=9, batch=1)
    model.ir_version = 4
    onnx.save(model, str(path))
    return path


def test_qdq_summary_report_and_latency(capsys, tmp_path, digits_model, digits_data) -> None:
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    common = ["compress", str(digits_model), "--target", "fake", "--method", "prune",
              "--prune", "0.3", "--bits", "4", "--quantizer",
              "symmetric", "--granularity", "channel", "--data", str(digits_data)]
    code, stdout, err = cli(capsys, *common, "-o", str(out), "--format", "qdq", "--report",
                                str(rep), "--latency")
    assert code == 0, err
    code, _, err = cli(capsys, *common, "-o", str(tmp_path / "f.onnx"), "--report",
                           str(tmp_path / "f.json"))
    assert code == 0, err
    fake = json.loads((tmp_path / "f.json").read_text())
    assert "qdq: 7 int4 weights, opset 17 -> 21" in stdout
    assert "latency" in stdout and "FLOPs" in stdout and "params" in stdout
    report = json.loads(rep.read_text())
    assert report["size_after"] == out.stat().st_size
    assert report["size_after"] < 0.15 * report["size_before"]
    assert report["storage"]["format"] == "qdq" and report["storage"]["opset_after"] == 21
    assert report["config"]["storage"]["format"] == "qdq"
    latency = report["latency"]
    assert latency["batch"] == 1 and latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert 0 < latency["flops_ratio"] < 1
    kinds = {x["quantization"]["storage"]["dtype"] for x in report["layers"]
             if x["quantization"]}
    assert kinds == {"int4"}
    # Verification ran on the integer model and scores exactly like its fake twin.
    assert report["accuracy_after"] == fake["accuracy_after"]
    assert report["fidelity"][0]["max_abs"] == pytest.approx(fake["fidelity"][0]["max_abs"],
                                                             abs=1e-5)
    assert report["size_after"] < 0.2 * fake["size_after"]
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version >= 10
    assert sum(t.data_type == TensorProto.INT4 for t in m.graph.initializer) == 7


def test_fake_format_reports_float_storage(capsys, tmp_path, digits_model) -> None:
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capsys, "compress", str(digits_model), "-o", str(out), "--bits",
                                "6", "--block-size", "8", "--quantizer", "asymmetric",
                                "--no-verify", "--report", str(rep),
                                    "--target", "fake", "--method", "prune")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["storage"]["format"] == "fake" and report["storage"]["weights"] == \
        {"float32": 7}
    q = next(x["quantization"] for x in report["layers"] if x["quantization"])
    assert q["granularity"] == "block" and q["block_size"] == 8
    assert q["storage"]["dtype"] == "float32"


@pytest.mark.parametrize("args, needle", [
    (["--bits", "4", "--format", "qdq"], "cannot store the paper grid"),
    (["--format", "qdq", "--quantizer", "symmetric"], "give --bits"),
    (["--bits", "6", "--quantizer", "symmetric", "--format", "qdq", "--container", "int4"],
     "at most 4 bits"),
    (["--bits", "4", "--container", "int8"], "apply to --format qdq"),
    (QDQ4 + ["--opset", "99"], "newer than the installed onnx"),
    (QDQ4 + ["--opset", "18"], "int4 DequantizeLinear needs opset >= 21"),
    (["--bits", "8", "--quantizer", "symmetric", "--format", "qdq", "--opset", "15"],
     "older than the model's opset 17"),
    (["--bits", "4", "--block-size", "1"], "block size must be an integer >= 2"),
    (["--block-size", "16"], "give --bits too"),
    (["--bits", "4", "--format", "int3"], "invalid choice"),
])
def test_bad_format_options_are_refused(capsys, tmp_path, digits_model, args, needle) -> None:
    assert_refused(capsys, tmp_path / "o.onnx", needle, "compress", str(digits_model), *args,
        "--target", "fake", "--method", "prune")


@pytest.mark.parametrize("kind, needle", [
    ("custom", "custom-domain op"),
    ("input", "also a graph input"),
    ("double", "is double"),
])
def test_weights_dequantizelinear_cannot_feed_are_refused(capsys, tmp_path, kind,
                                                          needle) -> None:
    src = _gemm(tmp_path / "m.onnx", dtype=np.float64 if kind == "double" else np.float32,
                custom_reader=kind == "custom", weight_is_input=kind == "input")
    assert_refused(capsys, tmp_path / "o.onnx", needle, "compress", str(src), *QDQ4,
        "--target", "fake", "--method", "prune")


def _groupnorm_opset18(path: Path) -> Path:
    """Conv -> GroupNormalization-18 -> Conv. onnx's converter moves it to opset 21 without
    turning the per-group scale into a per-channel one: the result passes the full checker,
    but ONNX Runtime refuses it, so the converted model is run before it is used."""
    norm = helper.make_node("GroupNormalization", ["a", "sc", "bi"], ["b"], num_groups=2,
                            name="gn")
    scale_bias = [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sc"),
                  numpy_helper.from_array(np.array([0.5, -0.5], np.float32), "bi")]
    onnx.save(conv_pair(norm, opset=18, batch=1, extra_inits=scale_bias), str(path))
    return path


def test_conversion_that_breaks_the_model_is_refused(capsys, tmp_path) -> None:
    src = _groupnorm_opset18(tmp_path / "gn.onnx")
    assert_refused(capsys, tmp_path / "o.onnx", "ONNX Runtime cannot run the converted model",
                   "compress", str(src), *QDQ4, "--target", "fake", "--method", "prune")


def test_unconvertible_opset_is_refused(capsys, tmp_path) -> None:
    src = _mvn_opset9(tmp_path / "mvn.onnx")
    assert_refused(capsys, tmp_path / "o.onnx", "cannot convert the model from opset 9 to 21",
                   "compress", str(src), *QDQ4, "--target", "fake", "--method", "prune")
    # Per-tensor int8 needs only opset 10, which converts cleanly.
    code, _, err = cli(capsys, "compress", str(src), "-o", str(tmp_path / "o8.onnx"),
                           "--bits", "8", "--quantizer", "symmetric", "--format", "qdq",
                               "--target", "fake", "--method", "prune")
    assert code == 0, err
    assert onnx.load(str(tmp_path / "o8.onnx")).opset_import[0].version == 10


def test_bench_tools_run_on_the_digits_model(capsys, tmp_path, digits_model) -> None:
    js = tmp_path / "lat.json"
    assert tool_module("bench_latency").main([str(digits_model), "--ratios", "0.3", "--round-to",
                                        "1,8", "--batches", "1,4", "--runs", "3", "--json",
                                        str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {"original", "prune 30%", "prune 30% round 8", "qdq int8",
                        "qdq int8, disable_quant_qdq"}
    assert {r["batch"] for r in rows} == {1, 4}
    pruned = next(r for r in rows if r["variant"] == "prune 30%")
    assert pruned["flops_ratio"] < 0.8 and pruned["within_target"] in (True, False)
    assert "| lat/FLOPs - 1 |" in capsys.readouterr().out
    sizes = tmp_path / "size.json"
    assert tool_module("bench_size").main([str(digits_model), "--json", str(sizes)]) == 0
    row = json.loads(sizes.read_text())[0]
    assert row["modes"]["int4 channel"]["ratio"] < row["modes"]["int8 channel"]["ratio"] < 0.35
