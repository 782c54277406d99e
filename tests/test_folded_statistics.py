"""Data-free statistics on BN-folded graphs (issue 16): the ``recon`` criterion ranks channels
the same with BatchNorm kept or folded (l1 does not), ``--criterion auto`` picks it where udfc+
reads the proxy photographs of a graph without BN, and the short class prior moves the crops
towards their classes. The crops of a BN-kept graph take a short model inversion instead
(``tests/test_moment_proxy.py``)."""

from __future__ import annotations

import numpy as np
import onnx
from numpy.testing import assert_allclose
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.channels.activations import pruning_moments
from onnx_udfc.channels.select import reconstruction_scores, resolve_criterion
from onnx_udfc.core.normalize import fold_batchnorm
from onnx_udfc.moments import proxy
from onnx_udfc.moments.sampled import free_batch
from onnx_udfc.moments.source import MomentSource
from tests.helpers import analysed, bn_chain, run, session


def _rescaled_bn_chain() -> onnx.ModelProto:
    """:func:`bn_chain` with BN gains multiplied by 1-8 (channel 5 stays an
    exact multiple of channel 0), so folding reorders the filters' l1 norms."""
    model = bn_chain()
    gamma = next(t for t in model.graph.initializer if t.name == "g")
    spread = np.array([1.0, 8.0, 4.0, 5.0, 3.0, 1.0], np.float32)
    gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) * spread, "g"))
    return model


def _recon_order(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[list, list]:
    """(recon removal order, l1 order) of conv1's channels, moments measured on ``feed``."""
    a = analysed(_free_batch(model))
    ctx = a.channels
    moments = pruning_moments(ctx, MomentSource(ctx.model, calibration=feed), "test")
    scores, fallback = reconstruction_scores(ctx, moments, ctx.class_scores("l1"))
    assert not any(f.startswith("conv1:") for f in fallback)
    [conv1] = [p for p in ctx.producers if p.node.name == "conv1"]
    cls = ctx.roots()[conv1.slots]
    l1 = ctx.class_scores("l1")[cls]
    return np.argsort(scores[cls], kind="stable").tolist(), np.argsort(l1).tolist()


def test_recon_ranks_the_same_channels_with_bn_kept_or_folded():
    kept = _rescaled_bn_chain()
    folded = onnx.ModelProto()
    folded.CopyFrom(kept)
    fold_batchnorm(folded)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    feed = {"x": np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    assert_allclose(run(_free_batch(kept), feed)[0], run(_free_batch(folded), feed)[0],
                    rtol=1e-4, atol=1e-4)
    recon_kept, l1_kept = _recon_order(kept, feed)
    recon_folded, l1_folded = _recon_order(folded, feed)
    assert l1_kept != l1_folded  # folding the BN gains reorders the filters' norms
    assert recon_kept == recon_folded
    assert recon_kept[0] in (0, 5)  # one of the exact pair goes first: the other rebuilds it


def _conv_map() -> onnx.ModelProto:
    """Conv -> Relu -> Conv to a feature map: an image model that is not a classifier."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
        [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((4, 6, 3, 3)).astype(np.float32), "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_auto_criterion_is_recon_for_udfc_plus_on_proxy_or_real_moments_without_bn():
    folded, kept = bn_chain(with_bn=False), bn_chain()
    assert resolve_criterion("auto", "udfc+", "proxy", folded) == "recon"
    assert resolve_criterion("auto", "udfc+", "proxy", kept) == "l1"  # BN re-anchors: l1
    assert resolve_criterion("auto", "udfc+", "sampled", folded) == "l1"
    # with the user's data too, l1 would rank BN-scaled filters (data_free.md: folded
    # ResNet-56 at 50 %, 256 real images: l1 81.5, recon 88.2)
    assert resolve_criterion("auto", "udfc+", "measured", folded) == "recon"
    assert resolve_criterion("auto", "udfc+", "measured", kept) == "l1"
    mlp = helper.make_model(helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")]))
    assert resolve_criterion("auto", "udfc+", "measured", mlp) == "l1"  # no BN to fold
    assert resolve_criterion("auto", "prune", "proxy", folded) == "l1"
    assert resolve_criterion("l2", "udfc+", "proxy", folded) == "l2"
    _, report = api.compress(folded, prune=0.3, method="udfc+", bits=8, target="fake")
    assert (report.criterion, report.moments["used"]) == ("recon", "proxy")
    _, report = api.compress(kept, prune=0.3, method="udfc+", bits=8, target="fake")
    assert (report.criterion, report.moments["used"]) == ("l1", "sampled")
    # the sequential fit's pink noise with proxy crops beside it (fifth round): still l1
    _, report = api.compress(kept, prune=0.3, method="udfc+", bits=8, target="fake",
                             sequential=True)
    assert (report.criterion, report.moments["used"]) == ("l1", "sampled")
    assert report.moments["proxy_crops"] > 0
    _, report = api.compress(kept, prune=0.3, method="udfc+", bits=8, target="fake",
                             sequential=True, moments="sampled")  # asked for: plain noise
    assert "proxy_crops" not in report.moments
    _, report = api.compress(folded, prune=0.3, method="prune", target="fake")
    assert report.criterion == "l1"
    calibration = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _, report = api.compress(folded, prune=0.3, method="udfc+", calibration=calibration,
                             target="fake")
    assert (report.criterion, report.moments["used"]) == ("recon", "measured")


def _free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return free_batch(copy)


def _cross_entropy(model: onnx.ModelProto, x: np.ndarray) -> float:
    """Mean cross-entropy of the logits to class ``i mod K`` for sample ``i``."""
    logits = session(_free_batch(model)).run(None, {"x": x})[0].astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-logp[np.arange(len(x)), np.arange(len(x)) % logits.shape[1]].mean())


def test_class_prior_moves_the_crops_towards_their_classes_and_stays_near_them():
    model = bn_chain(with_bn=False)
    crops = proxy.proxy_inputs(model, seed=0)
    fitted, fit = proxy.fitted_inputs(model, crops, seed=0)
    before, after = crops["x"], fitted["x"]
    assert after.shape == before.shape and after.dtype == np.float32
    assert _cross_entropy(model, after) < 0.75 * _cross_entropy(model, before)
    assert 0 < np.linalg.norm(after - before) < 0.5 * np.linalg.norm(before)
    assert fit is not None and (fit["steps"], fit["batchnorms"], fit["class_prior"]) == \
        (proxy.PRIOR_STEPS, 0, True)
    not_classifier = _conv_map()
    feed = proxy.proxy_inputs(not_classifier, seed=0)
    assert proxy.fitted_inputs(not_classifier, feed, seed=0) == (feed, None)


def test_proxy_moments_of_a_folded_classifier_come_from_the_fitted_crops():
    model = bn_chain(with_bn=False)
    source = MomentSource(model, "proxy")
    drawn = source.sample_feed(model, 128)["x"]
    assert not np.allclose(drawn, proxy.proxy_inputs(model, seed=0)["x"])
    assert source.fallbacks == [] and source.to_dict()["fit"]["class_prior"]


def test_quantization_alone_reads_the_crops_as_drawn():
    model = bn_chain(with_bn=False)
    source = MomentSource(model, "proxy", pruning=False)
    np.testing.assert_array_equal(source.sample_feed(model, 128)["x"],
                                  proxy.proxy_inputs(model, seed=0)["x"])
    assert "fit" not in source.to_dict()
    _, report = api.compress(model, target="int4")
    assert report.moments["used"] == "proxy" and "fit" not in report.moments
    _, report = api.compress(model, target="int4", prune=0.3)
    assert report.moments["fit"]["class_prior"]
