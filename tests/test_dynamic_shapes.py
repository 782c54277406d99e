"""Dynamic input sizes end to end: the size a run works at (--input-shape, a size the model
states, the default side), every stage that runs the network (sampling, inversion, the
sequential fit, the guard, latency), and an output that keeps its dynamic dims."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.input_shapes import DEFAULT_SIDE, working_input_shapes
from onnx_udfc.report.verify import compare
from tests.helpers import Builder, cli, run


def dynamic_cnn(dims: list, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Conv-BN-Relu x2 -> Conv on an input of ``dims`` (symbolic names for dynamic sizes)."""
    b = Builder(seed=3)
    x = b.input("x", dims)
    h = b.relu(b.bn(b.conv(x, dims[1], 16, name="c0"), 16))
    h = b.relu(b.bn(b.conv(h, 16, 16, name="c1"), 16))
    b.output(b.conv(h, 16, 8, name="c2"))
    model = b.build()
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def dims_of(model: onnx.ModelProto) -> list:
    return [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]


@pytest.mark.parametrize("dims,metadata,shape,origin", [
    (["N", 3, "H", "W"], None, [1, 3, DEFAULT_SIDE, DEFAULT_SIDE], f"default {DEFAULT_SIDE}"),
    ([1, 1, 32, "W"], None, [1, 1, 32, 32], "the input's static sizes"),
    (["N", 3, "H", "W"], {"imgsz": "[24, 40]"}, [1, 3, 24, 40], "model metadata 'imgsz'"),
    (["N", 3, "H", "W"], {"imgsz": "20"}, [1, 3, 20, 20], "model metadata 'imgsz'"),
])
def test_working_shape_sources(dims, metadata, shape, origin):
    chosen = working_input_shapes(dynamic_cnn(dims, metadata))["x"]
    assert chosen.dims == shape and chosen.origin == origin


def test_given_shape_wins_and_batch_only_inputs_stay_free():
    model = dynamic_cnn(["N", 3, "H", "W"], {"imgsz": "20"})
    assert working_input_shapes(model, {"x": [2, 3, 8, 12]})["x"].dims == [2, 3, 8, 12]
    assert working_input_shapes(dynamic_cnn(["N", 3, 8, 8])) == {}


def test_dynamic_channel_axis_refused_with_the_option_to_pass():
    model = dynamic_cnn(["N", 3, 8, 8])
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"
    with pytest.raises(UdfcError, match="dynamic dimension 1.*--input-shape x:1x1x8x8"):
        working_input_shapes(model)


@pytest.mark.parametrize("options", [
    (),  # balanced: udfc+ on sampled moments, int8
    ("--preset", "best"),  # the sequential fit runs the network on sampled inputs
    ("--moments", "inverted"),  # model inversion at the working size
])
def test_compress_without_input_shape(capfd, tmp_path, options):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(dynamic_cnn(["N", 3, "H", "W"], {"imgsz": "16"}), src)
    code, stdout, err = cli(capfd, "compress", str(src), "-o", str(out), "--prune", "0.25",
                            "--report", str(rep), *options)
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["input_shapes"] == {"x": {"shape": [1, 3, 16, 16],
                                            "from": "model metadata 'imgsz'"}}
    assert "x worked at 1x3x16x16" in stdout
    assert report["moments"]["fallbacks"] == []
    comps = [x["compensation"] for x in report["layers"] if x["compensation"]]
    assert comps and all(c["compensated"] for c in comps)
    written = onnx.load(str(out))
    assert dims_of(written) == ["N", 3, "H", "W"]
    for shape in ([2, 3, 16, 16], [1, 3, 24, 40]):  # other sizes still run
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert run(written, {"x": x})[0].shape[2:] == tuple(shape[2:])


def test_latency_runs_at_the_working_size(capfd, tmp_path):
    src, out, rep = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(dynamic_cnn([1, 1, 12, "W"]), src)
    code, _, err = cli(capfd, "compress", str(src), "-o", str(out), "--latency",
                       "--report", str(rep), "--target", "fake", "--method", "prune",
                       "--prune", "0.5")
    assert code == 0, err
    report = json.loads(rep.read_text())
    assert report["input_shapes"]["x"]["shape"] == [1, 1, 12, 12]
    assert report["latency"]["before_ms"] > 0


def lstm_model(hidden: int = 32) -> onnx.ModelProto:
    """Conv features [T, 1, 16] -> LSTM (W, R, B constant) -> its sequence output."""
    rng = np.random.default_rng(7)
    b = Builder(seed=5)
    x = b.input("x", [1, 16, "T"])
    feats = b.op("Transpose", [b.relu(b.op("Conv", [x, b.weight("c.weight", [16, 16, 3])],
                                            "c", pads=[1, 1], kernel_shape=[3]))],
                 "t", perm=[2, 0, 1])
    w = b.const(rng.standard_normal((1, 4 * hidden, 16)) * 0.3, "lstm.W")
    r = b.const(rng.standard_normal((1, 4 * hidden, hidden)) * 0.3, "lstm.R")
    bias = b.const(rng.standard_normal((1, 8 * hidden)) * 0.1, "lstm.B")
    y = b.op("LSTM", [feats, w, r, bias], "lstm", hidden_size=hidden)
    b.output(b.op("Squeeze", [y, b.ints([1])], "seq"))
    return b.build()


def test_recurrent_weights_are_stored_as_integers():
    model = lstm_model()
    out, report = api.compress(model, input_shapes={"x": [1, 16, 20]})
    assert set(report.other_weights) == {"lstm:W", "lstm:R"}
    assert all(q["bits"] == 8 and q["storage"]["dtype"] == "int8"
               for q in report.other_weights.values())
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert lstm.input[1] in dq and lstm.input[2] in dq
    assert report.size_after < 0.5 * report.size_before  # float32 -> int8, biases stay float
    x = np.random.default_rng(1).standard_normal((1, 16, 33)).astype(np.float32)
    before, after = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert np.abs(after - before).max() < 0.05 * np.abs(before).max()
    assert "layers at 8 bits" in report.summary()


def test_excluded_recurrent_weights_stay_float_and_are_named():
    _, report = api.compress(lstm_model(), input_shapes={"x": [1, 16, 20]},
                             quant_exclude=["lstm"])
    assert not report.other_weights
    assert {f["node"] for f in report.float_layers} >= {"lstm:W", "lstm:R"}


def test_sequence_logits_get_per_step_agreement():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 1, 50))
    noisy = logits.copy()
    noisy[:3, 0] = rng.standard_normal((3, 50)) * 5  # three steps decide differently
    fid = compare([logits], [noisy], ["seq"])[0]
    assert fid.top1_agreement is not None and 0.7 <= fid.top1_agreement < 1.0
    assert fid.worst_channel is not None  # per class, over the time steps



def test_proxy_images_are_drawn_at_the_working_size():
    b = Builder(seed=2)
    x = b.input("x", ["N", 3, "H", "W"])
    h = b.relu(b.conv(b.relu(b.conv(x, 3, 16, name="c0")), 16, 16, name="c1"))
    b.output(b.conv(h, 16, 8, name="c2"))
    model = b.build()  # no BatchNorm: auto picks the proxy photographs
    model.metadata_props.add(key="imgsz", value="24")
    _, report = api.compress(model, prune=0.25)
    assert report.moments == {"requested": "auto", "used": "proxy", "fallbacks": []}
    comps = [x["compensation"] for x in report.layers if x["compensation"]]
    assert comps and all(c["compensated"] for c in comps)
