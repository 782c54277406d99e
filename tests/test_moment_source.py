"""The run's moment source (onnx_udfc.moments.source): the kind is resolved once, a refused
sampling run falls back to the propagation once and says why, and the report names the source."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.moments import source as source_module
from onnx_udfc.moments.measured import measure
from onnx_udfc.moments.sampled import sampled_moments, synthetic_inputs
from onnx_udfc.moments.source import MomentSource
from tests.helpers import bn_chain, conv_bn_relu_model, random_feeds

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_udfc"


def _mlp() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    return helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w]))


def _baked_batch() -> onnx.ModelProto:
    """``_bn_chain`` with its Flatten replaced by a Reshape to the fixed batch of 2: ORT refuses
    any other batch (the Gemm then sees 2 rows of 256 features, not 128 rows of 4)."""
    model = bn_chain()
    model.graph.initializer.append(numpy_helper.from_array(np.asarray([2, -1], np.int64),
                                                           "flat_shape"))
    flat = next(n for n in model.graph.node if n.op_type == "Flatten")
    flat.op_type = "Reshape"
    flat.input.append("flat_shape")
    return model


def test_auto_samples_a_conv_net_and_propagates_an_mlp():
    assert MomentSource(conv_bn_relu_model(13)).kind == "sampled"
    assert MomentSource(_mlp()).kind == "propagated"
    assert MomentSource(conv_bn_relu_model(13), "propagated").kind == "propagated"
    with pytest.raises(UdfcError, match="moments"):
        MomentSource(_mlp(), "measured")


def test_calibration_measures_whatever_was_asked():
    model = bn_chain()
    feed = random_feeds(model, batch=2, seed=0)
    source = MomentSource(model, "propagated", calibration=feed)
    assert source.kind == "measured"
    got = source.moments(model, infer_shapes(model), ["r1"], stage="test")
    want = measure(model, feed, ["r1"])
    np.testing.assert_array_equal(got["r1"].mean, want["r1"].mean)
    assert source.to_dict() == {"requested": "propagated", "used": "measured", "fallbacks": []}


def test_inverted_reads_the_given_batch():
    model = conv_bn_relu_model(13)
    shapes = infer_shapes(model)
    batch = synthetic_inputs(model, seed=5)
    source = MomentSource(model, "inverted", samples=batch)
    got = source.moments(model, shapes, ["n"], stage="test")["n"]
    want = sampled_moments(model, ["n"], shapes, feed=batch)["n"]
    np.testing.assert_array_equal(got.cov, want.cov)


def test_refused_batch_falls_back_once_with_its_cause(monkeypatch):
    model = _baked_batch()
    shapes = infer_shapes(model)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return sampled_moments(*args, **kwargs)

    monkeypatch.setattr(source_module, "sampled_moments", counted)
    source = MomentSource(model)
    assert source.kind == "sampled"
    first = source.moments(model, shapes, ["r1"], stage="plan")
    assert np.isfinite(first["r1"].mean).all()
    assert source.kind == "propagated"
    [fallback] = source.fallbacks
    assert fallback["from"] == "sampled" and fallback["to"] == "propagated"
    assert fallback["stage"] == "plan"
    assert "Gemm" in fallback["cause"] and "\n" not in fallback["cause"]
    second = source.moments(model, shapes, ["r1"], stage="quantize")
    assert len(calls) == 1 and len(source.fallbacks) == 1  # decided once, not retried
    np.testing.assert_array_equal(first["r1"].mean, second["r1"].mean)


def test_report_names_the_source_and_the_fallback():
    _, report = api.compress(_baked_batch(), prune=0.3, method="udfc+", bits=8, target="fake")
    moments = report.to_dict()["moments"]
    assert moments["requested"] == "auto" and moments["used"] == "propagated"
    [fallback] = moments["fallbacks"]  # compensate fell back; quantize did not retry
    assert (fallback["from"], fallback["stage"]) == ("sampled", "compensate")
    assert "moments propagated (fallback in compensate: sampled failed: InvalidArgument" \
        in report.summary()

    _, report = api.compress(bn_chain(), prune=0.3, method="udfc+", target="fake")
    assert report.moments == {"requested": "auto", "used": "sampled", "fallbacks": []}
    assert "\nmoments sampled\n" in report.summary()
    _, report = api.compress(bn_chain(), prune=0.3, method="udfc", target="fake")
    assert report.moments is None and "moments" not in report.summary()


def test_no_blanket_exception_handler_in_moments_or_methods():
    blanket = re.compile(r"except\s*(\(\s*)?(Exception|BaseException)?\s*\)?\s*(as\s+\w+\s*)?:")
    paths = sorted(p for folder in ("moments", "methods") for p in (PACKAGE / folder).glob("*.py"))
    found = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}" for path in paths
             for i, line in enumerate(path.read_text().splitlines(), 1) if blanket.search(line)]
    assert not found, "\n".join(found)
