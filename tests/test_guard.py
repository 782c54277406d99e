"""The fidelity guard: per-channel errors, the default verdict, and --max-error back-off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnx_udfc.config import CompressConfig
from onnx_udfc.outputs import backoff_plans
from onnx_udfc.report.fidelity import channel_axis, channel_errors, default_limit, verdict
from onnx_udfc.report.verify import compare
from tests.helpers import Builder, cli, conv_bn_relu_model


def test_channel_axis_follows_the_layout():
    assert channel_axis((8, 10)) == 1 and channel_axis((2, 16, 5, 5)) == 1
    assert channel_axis((1, 84, 8400)) == 1 and channel_axis((1, 8400, 85)) == 2
    assert channel_axis((7,)) is None


def test_small_score_rows_are_not_hidden_by_large_coordinates():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 640, size=(1, 4, 500))
    scores = rng.uniform(0, 1, size=(1, 3, 500))
    before = np.concatenate([boxes, scores], axis=1)
    after = before.copy()
    after[:, 4:] = rng.uniform(0, 1, size=(1, 3, 500))  # every score destroyed
    fid = compare([before], [after], ["out"])[0]
    assert fid.cosine > 0.99  # what a whole-output metric sees
    errors = channel_errors(before, after)
    assert errors[:4].max() == 0 and errors[4:].min() > 1.0
    assert fid.worst_channel >= 4 and fid.channel_error > 1.0
    holds, sentence = verdict([fid.to_dict()], 0.7, "data")
    assert not holds and "channel" in sentence


def test_constant_channel_cannot_blow_up_on_rounding():
    before = np.stack([np.linspace(0, 1, 100), np.full(100, 5.0)])[None]
    after = before + np.array([0.0, 1e-6])[None, :, None]
    assert channel_errors(before, after).max() < 1e-3


def test_backoff_plans_relax_pruning_then_bits():
    config = CompressConfig.resolve(prune=0.4, bits=4, target="fake", method="udfc")
    steps = [(p.prune.ratio, p.quant.bits) for p in backoff_plans(config)]
    assert steps == [(0.4, 4), (0.3, 4), (0.2, 4), (0.1, 4), (0.0, 4), (0.0, 8)]


def test_a_broken_default_run_is_flagged_in_plain_words(capfd, tmp_path, digits_model,
                                                        digits_data):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune",
                            "0.5", "--method", "prune", "--data", str(digits_data),
                            "--report", str(rep))
    assert code == 0 and out.exists()
    assert "likely broken" in err and "LIKELY BROKEN" in stdout
    guard = json.loads(rep.read_text())["guard"]
    assert guard["inputs"] == "data" and guard["holds"] is False


def test_max_error_backs_off_until_it_holds(capfd, tmp_path, digits_model, digits_data):
    out, rep = tmp_path / "d.onnx", tmp_path / "r.json"
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune", "0.5",
                       "--method", "prune", "--data", str(digits_data), "--max-error", "0.7",
                       "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    attempts = report["guard"]["attempts"]
    assert len(attempts) > 1 and attempts[-1]["holds"] and not attempts[0]["holds"]
    assert report["config"]["prune"]["ratio"] == attempts[-1]["prune"] < 0.5
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.05


def test_max_error_that_nothing_meets_stops_without_a_file(capfd, tmp_path, digits_model):
    out = tmp_path / "d.onnx"
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--prune", "0.3",
                       "--max-error", "1e-9")
    assert code == 1 and "nothing written" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".udfc-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [(["--max-error", "0"], "--max-error"),
                                          (["--max-error", "0.5", "--no-verify"], "no-verify")])
def test_bad_guard_options_are_refused(capfd, tmp_path, digits_model, args, needle):
    code, _, err = cli(capfd, "compress", str(digits_model), "-o", str(tmp_path / "d.onnx"),
                       *args)
    assert code == 2 and needle in err


def test_unknown_rank_leaves_the_node_alone_with_a_reason():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_udfc.channels.analysis import analyse
    from onnx_udfc.core.io import infer_shapes

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Concat", ["c", "c"], ["y"], axis=-3, name="cat")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    shapes = {k: v for k, v in infer_shapes(model).items() if k not in ("c", "y")}  # ranks lost
    ctx = analyse(model, shapes)
    assert ("cat", "the rank of its input is unknown (fix it with --input-shape)") in \
        ctx.unsupported


def test_a_collapsed_channel_reads_zero_correlation():
    from onnx_udfc.core.drift import channel_correlations

    rng = np.random.default_rng(0)
    before = rng.standard_normal((4, 3, 50))  # [N, A, B]: the 3 rows are the channels
    before[:, 2] = 5.0  # a constant channel has no correlation to speak of: skipped
    after = before + 0.01 * rng.standard_normal(before.shape)
    after[:, 1] = 0.2  # collapsed to a constant
    corr = channel_correlations(before, after)
    assert corr.shape == (2,) and corr[0] > 0.99 and abs(corr[1]) < 1e-9


def test_correlation_limits_apply_to_dense_outputs():
    from onnx_udfc.report.fidelity import BROKEN_CORRELATION

    dense = [{"output": "boxes", "channel_error": 1.2, "worst_channel": 4,
              "top1_agreement": None, "channel_correlation": 0.3}]
    holds, sentence = verdict(dense, default_limit("photos"), "photos")
    assert not holds and "correlation with the original fell to 0.30" in sentence
    assert BROKEN_CORRELATION["photos"] > 0.3
    # PP-OCRv4's text detector at int8 (its text masks 99.5 % the same) reads r 0.94 on the
    # photographs: the default preset is not called broken
    assert verdict([dict(dense[0], channel_correlation=0.94, channel_error=0.34)],
                   default_limit("photos"), "photos")[0]
    # on pink noise only a collapse: ddddocr's pruned detector reads 0.01-0.06 there (its
    # boxes gone, error 2.7-3.0 under the limit), PP-OCRv4's size budget 0.46 (task within 3)
    assert verdict(dense, default_limit("synthetic"), "synthetic")[0]
    collapsed = [dict(dense[0], channel_correlation=0.06, channel_error=2.8)]
    holds, sentence = verdict(collapsed, default_limit("synthetic"), "synthetic")
    assert not holds and "fell to 0.06 (limit 0.2)" in sentence
    assert BROKEN_CORRELATION["synthetic"] < 0.46
    logits = [dict(dense[0], top1_agreement=0.9)]  # classifiers: judged by their decisions
    assert verdict(logits, default_limit("photos"), "photos")[0]
    assert verdict([dict(logits[0], channel_correlation=0.01)], default_limit("synthetic"),
                   "synthetic")[0]


def test_guard_feeds_photographs_to_image_models_only():
    from onnx_udfc.core.input_shapes import shape_lists, working_input_shapes
    from onnx_udfc.moments.comparison import GUARD_BATCH, guard_feeds

    image_model = conv_bn_relu_model(13)
    feeds = dict(guard_feeds(image_model, shape_lists(working_input_shapes(image_model))))
    assert list(feeds) == ["synthetic", "photos"]
    x = next(iter(feeds["photos"].values()))
    assert len(x) == GUARD_BATCH and not np.array_equal(x, feeds["synthetic"]["x"])
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-2  # standardised
    b = Builder(seed=1)
    b.output(b.gemm(b.relu(b.gemm(b.input("x", ["N", 16]), 16, 8)), 8, 4))
    assert [kind for kind, _ in guard_feeds(b.build(), {})] == ["synthetic"]


def test_the_guard_holds_only_when_every_kind_of_input_holds():
    from onnx_udfc.outputs import _verdicts

    ok = [{"output": "y", "channel_error": 0.1, "worst_channel": 0, "top1_agreement": None,
           "channel_correlation": 0.99}]
    collapsed = [dict(ok[0], channel_correlation=0.1)]
    holds, sentence, limits = _verdicts({"synthetic": ok, "photos": collapsed}, None)
    assert not holds and sentence.endswith("on the photos inputs")
    assert limits == {"synthetic": 3.0, "photos": 3.0}
    assert _verdicts({"synthetic": ok, "photos": ok}, None)[0]
    assert _verdicts({"synthetic": ok, "photos": collapsed}, 0.5)[0]  # --max-error: errors only


def test_image_models_are_compared_on_noise_and_photographs(capfd, tmp_path, digits_model):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code, stdout, err = cli(capfd, "compress", str(digits_model), "-o", str(out), "--report",
                            str(rep))
    assert code == 0, err
    guard = json.loads(rep.read_text())["guard"]
    assert guard["inputs"] == "synthetic+photos" and guard["holds"]
    assert guard["limit"] == {"synthetic": 3.0, "photos": 3.0}
    [photos] = guard["fidelity"]["photos"]  # the digits CNN has one output
    assert photos["channel_error"] < 0.5 and photos["top1_agreement"] > 0.9
    assert "guard   ok on synthetic+photos inputs" in stdout


def test_outputs_are_read_with_their_channel_axis():
    from onnx_udfc.core.drift import squeeze_inner

    shapes = {(40, 1, 97): (40, 97), (8, 10, 1, 1): (8, 10), (8, 1, 32, 48): (8, 1, 32, 48),
              (8, 1): (8, 1), (8, 1, 1, 1): (8, 1)}
    for before, after in shapes.items():
        assert squeeze_inner(np.zeros(before)).shape == after, before


def test_constants_of_an_elementwise_op_with_unknown_ranks():
    """paddle2onnx graphs leave ranks unknown after dynamic shapes: a scalar-like constant
    still passes, a per-channel one cannot be aligned and leaves the node alone (before, an
    IndexError)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_udfc.channels.analysis import analyse
    from onnx_udfc.core.io import infer_shapes

    inits = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.full((1,), 2.0, np.float32), "two"),
             numpy_helper.from_array(np.ones((4, 1, 1), np.float32), "per_channel")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Mul", ["c", "two"], ["m"], name="scalar"),
         helper.make_node("Mul", ["m", "per_channel"], ["y"], name="channels")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    shapes = {k: v for k, v in infer_shapes(model).items() if k not in ("c", "m", "y")}
    ctx = analyse(model, shapes)
    reasons = dict(ctx.unsupported)
    assert "scalar" not in reasons
    assert "unknown rank" in reasons["channels"]
