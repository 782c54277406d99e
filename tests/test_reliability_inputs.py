"""Inputs the tool must refuse rather than compress into something wrong (issue 15): weight
layers whose layout contradicts their op, ``--input-shape`` values that contradict the model,
and models that are already quantized (which ``inspect`` still describes, with their real
cost). Every refusal is one line with exit status 2 and leaves no file behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.core.errors import UdfcError
from tests.helpers import (
    assert_refused,
    classifier,
    cli,
    conv_bn_relu_model,
    conv_pair,
    ort_quantized,
    weight_layer_model,
)

FAKE_PRUNE = ("--target", "fake", "--method", "prune", "--prune", "0.5", "--no-verify")


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape)


def _refused_one_line(err: str, code: int, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnx-udfc: error:"), err
    assert needle in lines[0], lines[0]


# -- 1. weight layouts that contradict their op ------------------------------------------------
MALFORMED = {
    "conv rank below the input's": (
        lambda: weight_layer_model("Conv", _weights(16, 8, 9)), "rank 3"),
    "conv bias longer than the outputs": (
        lambda: weight_layer_model("Conv", _weights(16, 8, 3, 3), _weights(5), pads=[1] * 4),
        "bias"),
    "conv group not dividing the outputs": (
        lambda: weight_layer_model("Conv", _weights(16, 8, 3, 3), group=3), "group 3"),
    "conv group not dividing the outputs, channels consistent": (
        lambda: weight_layer_model("Conv", _weights(15, 4, 3, 3), group=2), "group 2"),
    "conv weight reads other input channels": (
        lambda: weight_layer_model("Conv", _weights(16, 4, 3, 3)), "input channels"),
    "conv kernel_shape against the weight": (
        lambda: weight_layer_model("Conv", _weights(16, 8, 3, 3), kernel_shape=[5, 5]),
        "kernel_shape"),
    "conv transpose rank": (
        lambda: weight_layer_model("ConvTranspose", _weights(8, 4, 2)), "rank 3"),
    "conv transpose input channels": (
        lambda: weight_layer_model("ConvTranspose", _weights(6, 4, 2, 2)), "input channels"),
    "conv transpose bias": (
        lambda: weight_layer_model("ConvTranspose", _weights(8, 4, 2, 2), _weights(8)), "bias"),
    "gemm weight rank": (
        lambda: weight_layer_model("Gemm", _weights(8, 4, 2), x_shape=(1, 8)), "rank 3"),
    "gemm inner dimension": (
        lambda: weight_layer_model("Gemm", _weights(6, 4), x_shape=(1, 8)), "input features"),
    "gemm bias": (
        lambda: weight_layer_model("Gemm", _weights(8, 4), _weights(3), x_shape=(1, 8)),
        "bias"),
    "matmul inner dimension": (
        lambda: weight_layer_model("MatMul", _weights(6, 4), x_shape=(1, 5, 8)),
        "input features"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_layer_refused_by_inspect_compress_and_api(capfd, tmp_path, case):
    build, needle = MALFORMED[case]
    src = _save(build(), tmp_path / "in.onnx")
    code, _, err = cli(capfd, "inspect", str(src))
    _refused_one_line(err, code, "layer: ")
    assert needle in err
    assert_refused(capfd, tmp_path / "out.onnx", "layer: ", "compress", str(src), *FAKE_PRUNE)
    with pytest.raises(UdfcError, match="^layer: "):
        api.compress(build(), prune=0.5, target="fake", method="prune")


def test_well_formed_variants_are_not_refused():
    # Grouped, depthwise and transposed layers, a [1, N] Gemm bias and a broadcast bias.
    cases = [weight_layer_model("Conv", _weights(16, 4, 3, 3), _weights(16), group=2),
             weight_layer_model("Conv", _weights(16, 1, 3, 3), group=8),
             weight_layer_model("ConvTranspose", _weights(8, 2, 2, 2), _weights(4), group=2,
                                strides=[2, 2]),
             weight_layer_model("Gemm", _weights(4, 8), _weights(1, 4), x_shape=(1, 8),
                                transB=1),
             weight_layer_model("Gemm", _weights(8, 4), _weights(1), x_shape=(1, 8)),
             weight_layer_model("MatMul", _weights(8, 4), x_shape=(1, 5, 8))]
    for model in cases:
        api.compress(model, target="fake", method="prune")


# -- 2. --input-shape against the model ----------------------------------------------------------
CONTRADICTIONS = {  # on a static 1x3x16x16 input 'x'
    "channels": ("x:1x5x16x16", "dim 1"),
    "spatial": ("x:1x3x8x8", "dim 2"),
    "batch": ("x:4x3x16x16", "dim 0"),
    "rank": ("x:1x3x16", "rank 3"),
    "not an input": ("y:1x5x16x16", "'y'"),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictory_input_shape_refused_by_every_command(capfd, tmp_path, case):
    spec, needle = CONTRADICTIONS[case]
    src = _save(conv_bn_relu_model(17), tmp_path / "in.onnx")
    for command in (["inspect", str(src)], ["verify", str(src), str(src)]):
        code, _, err = cli(capfd, *command, "--input-shape", spec)
        _refused_one_line(err, code, "--input-shape")
        assert needle in err
    assert_refused(capfd, tmp_path / "out.onnx", needle, "compress", str(src), *FAKE_PRUNE,
                   "--input-shape", spec)


def test_verify_uses_the_input_shape_for_dynamic_dims(capfd, tmp_path):
    src = _save(conv_pair(height="H"), tmp_path / "in.onnx")
    report = tmp_path / "v.json"
    code, _, err = cli(capfd, "verify", str(src), str(src), "--input-shape", "x:2x3x5x8",
                       "--json", str(report))
    assert code == 0, err
    assert json.loads(report.read_text())["samples"] == 2


# -- 4. already-quantized models -------------------------------------------------------------
def _own_qdq(folder: Path) -> onnx.ModelProto:
    model, _ = api.compress(classifier(), target="int8", float_share=0.0)  # every layer
    return model


QUANTIZED = {
    "ort dynamic": lambda folder: ort_quantized(classifier(), folder, "dynamic"),
    "ort qdq": lambda folder: ort_quantized(classifier(), folder, "qdq"),
    "ort qoperator": lambda folder: ort_quantized(classifier(), folder, "qoperator"),
    "own qdq": _own_qdq,
}


def _inspected(capfd, path: Path, folder: Path) -> tuple[str, dict]:
    js = folder / f"{path.stem}.json"
    code, out, err = cli(capfd, "inspect", str(path), "--json", str(js))
    assert code == 0, err
    return out, json.loads(js.read_text())


@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_quantized_model_refused_by_compress(capfd, tmp_path, kind):
    src = _save(QUANTIZED[kind](tmp_path), tmp_path / "quantized.onnx")
    assert_refused(capfd, tmp_path / "out.onnx", "already quantized", "compress", str(src))
    assert_refused(capfd, tmp_path / "out.onnx", "float model", "compress", str(src),
                   "--bits", "4", "--target", "fake", "--no-verify")
    with pytest.raises(UdfcError, match="already quantized"):
        api.compress(onnx.load(str(src)))


@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_inspect_counts_quantized_layers(capfd, tmp_path, kind):
    original = _save(classifier(), tmp_path / "float.onnx")
    src = _save(QUANTIZED[kind](tmp_path), tmp_path / "quantized.onnx")
    _, before = _inspected(capfd, original, tmp_path)
    out, after = _inspected(capfd, src, tmp_path)
    assert "already quantized" in out
    assert sorted(after["quantized"]) == sorted(layer["name"] for layer in after["layers"])
    assert after["flops"] == before["flops"] > 0
    shapes = sorted((x["in_channels"], x["out_channels"], x["macs"]) for x in after["layers"])
    assert shapes == sorted((x["in_channels"], x["out_channels"], x["macs"])
                            for x in before["layers"])
    # Parameters are the stored weights and biases, in integers now; scales and zero points
    # are not parameters. quantize_dynamic rescales each layer's output in a plain Mul by its
    # weight scale (one per layer here), which counts as a constant of the graph.
    extra = len(after["layers"]) if kind == "ort dynamic" else 0
    assert after["params"] == before["params"] + extra
