"""``--moments proxy`` (onnx_udfc.moments.proxy): the shipped photographs and their licenses,
the augmented crops, the standardised feed, ``auto`` choosing it for image convnets without
BatchNorm, and the recorded fallback for a model that reads no image; the short model
inversion of the drawn samples (crops, or ``auto``'s pink noise for a sequential pruning fit of
a BN-kept network) and its recorded fallbacks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc import api
from onnx_udfc.channels.select import resolve_criterion
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.moments import proxy
from onnx_udfc.moments.source import MomentSource, folded_export, resolve
from tests.helpers import Builder, bn_chain, image

ROOT = Path(__file__).resolve().parents[1]


def _conv_on(shape: list[int]) -> onnx.ModelProto:
    """Conv (no BN) -> Relu -> Conv on an input of ``shape`` (rank 3 or 4, sides >= 5)."""
    rng = np.random.default_rng(0)
    kernel = [3] * (len(shape) - 2)
    w1 = rng.standard_normal((6, shape[1], *kernel)).astype(np.float32)
    w2 = rng.standard_normal((4, 6, *kernel)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                       [shape[0], 4, *[d - 4 for d in shape[2:]]])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_shipped_images_are_small_licensed_and_packaged():
    path = proxy.IMAGES
    assert path.stat().st_size < 512 * 1024
    with np.load(path) as npz:
        names = list(npz.files)
        arrays = [npz[k] for k in names]
    assert all(a.dtype == np.uint8 and max(a.shape[:2]) <= 256 for a in arrays)
    licenses = (path.parent / "LICENSES.md").read_text()
    assert all(f"| `{name}` |" in licenses for name in names)
    colour, grey = proxy.proxy_images()
    assert len(colour) >= 4 and all(a.shape[-1] == 3 for a in colour)
    assert len(grey) == len(names) and all(a.ndim == 2 for a in grey)
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = re.findall(r'"([^"]+)"', section.split("[")[1].split("]")[0])
    shipped = {p for pattern in patterns for p in (ROOT / "onnx_udfc").glob(pattern)}
    assert {path, path.parent / "LICENSES.md"} <= shipped


def test_crops_keep_a_flat_image_flat_and_follow_its_gradient():
    rng = np.random.default_rng(0)
    flat = np.full((40, 60, 3), 0.25)
    assert np.allclose(proxy.crop_resize(flat, 16, 8, rng), 0.25)
    ramp = np.tile(np.linspace(0, 1, 60), (40, 1))  # brighter to the right
    crops = [proxy.crop_resize(ramp, 8, 8, rng)[0] for _ in range(40)]
    slopes = [np.sign(c[:, -1].mean() - c[:, 0].mean()) for c in crops]
    assert crops[0].shape == (8, 8) and {-1.0, 1.0} <= set(slopes)  # flipped or not


def test_feed_is_standardised_seeded_and_grey_for_one_channel():
    model = bn_chain()  # input (2, 3, 8, 8)
    feed = proxy.proxy_inputs(model, seed=3)["x"]
    assert feed.shape == (proxy.SAMPLES, 3, 8, 8) and feed.dtype == np.float32
    assert np.allclose(feed.mean((0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(feed.std((0, 2, 3)), 1, atol=1e-4)
    assert np.array_equal(feed, proxy.proxy_inputs(model, seed=3)["x"])
    assert not np.allclose(feed, proxy.proxy_inputs(model, seed=4)["x"])
    shifted = proxy.proxy_inputs(model, 3, input_mean=(1, 2, 3), input_std=(2, 2, 2))["x"]
    assert np.allclose(shifted.mean((0, 2, 3)), [1, 2, 3], atol=1e-4)
    grey = proxy.proxy_inputs(_conv_on([1, 1, 28, 28]))["x"]
    assert grey.shape[1] == 1 and np.isclose(grey.std(), 1, atol=1e-4)


def test_auto_picks_proxy_for_image_convnets_without_batchnorm():
    assert resolve(bn_chain(), "auto") == "sampled"
    assert resolve(bn_chain(with_bn=False), "auto") == "proxy"
    assert resolve(_conv_on([1, 2, 16, 16]), "auto") == "sampled"  # 2 channels: no image
    assert resolve(_conv_on([1, 3, 64]), "auto") == "sampled"  # 1-D signal
    assert resolve(bn_chain(), "proxy") == "proxy"


def _one_batchnorm_in_four_convs(batchnorms: int) -> onnx.ModelProto:
    b = Builder(seed=0)
    h = image(b, hw=8)
    for i, cin in enumerate([3, 4, 4, 4]):
        h = b.conv(h, cin, 4)
        h = b.relu(b.bn(h, 4) if i < batchnorms else h)
    b.output(h)
    return b.build()


def test_an_export_that_folded_most_batchnorms_counts_as_folded():
    """PP-OCRv4's detector keeps 3 BatchNorms for 64 Convs: too few to re-anchor the
    sampled activations, so ``auto`` reads photographs and ranks channels by reconstruction."""
    few, half = _one_batchnorm_in_four_convs(1), _one_batchnorm_in_four_convs(2)
    assert folded_export(few) and not folded_export(half)
    assert resolve(few, "auto") == "proxy" and resolve(half, "auto") == "sampled"
    assert resolve_criterion("auto", "udfc+", "proxy", few) == "recon"


def test_auto_fits_the_pink_noise_to_the_batchnorms_when_the_sequential_fit_prunes():
    """With BatchNorm kept, the sequential pruning repair reads pink noise moved a few steps of
    model inversion towards the BN statistics (issue 16: docs/results/data_free.md); plain
    pink noise stays for quantization alone, the one-shot fit and an explicit
    ``--moments sampled``."""
    kept = bn_chain()
    assert resolve(kept, "auto") == "sampled"
    assert MomentSource(kept, "auto", sequential_pruning=True).fit_noise
    assert not MomentSource(kept, "auto").fit_noise
    assert not MomentSource(kept, "sampled", sequential_pruning=True).fit_noise
    assert not MomentSource(bn_chain(with_bn=False), "auto", sequential_pruning=True).fit_noise
    model, report = api.compress(kept, prune=0.3, method="udfc+", bits=8, sequential=True,
                                 target="fake")
    onnx.checker.check_model(model, full_check=True)
    moments = report.to_dict()["moments"]
    assert (moments["used"], moments["fallbacks"]) == ("sampled", [])
    fit = moments["fit"]
    assert (fit["steps"], fit["batchnorms"]) == (proxy.BN_FIT_STEPS, 1)
    assert fit["loss_end"] < fit["loss_start"]  # the BN's batch statistics moved towards its own
    crops = moments["proxy_crops"]
    assert f"moments sampled (with {crops} proxy crops; fitted: model inversion, " \
        f"{proxy.BN_FIT_STEPS} steps)" in report.summary()
    for plain_noise in ({"prune": 0.3}, {"prune": 0.0, "sequential": True},
                        {"prune": 0.3, "sequential": True, "moments": "sampled"}):
        _, report = api.compress(kept, method="udfc+", bits=8, target="fake", **plain_noise)
        assert report.moments["used"] == "sampled" and "fit" not in report.moments


def test_proxy_crops_of_a_batchnorm_network_take_the_same_short_inversion():
    kept = bn_chain()
    source = MomentSource(kept, "proxy")
    drawn = source.sample_feed(kept, 128)["x"]
    assert not np.allclose(drawn, proxy.proxy_inputs(kept, seed=0)["x"])
    fit = source.to_dict()["fit"]
    assert fit["batchnorms"] == 1 and fit["loss_end"] < fit["loss_start"]


def test_a_few_batchnorms_left_by_a_folded_export_take_no_fitting_step():
    few = _one_batchnorm_in_four_convs(1)
    feed = proxy.proxy_inputs(few, seed=0)
    assert proxy.fitted_inputs(few, feed, seed=0, batchnorm=False) == (feed, None)
    source = MomentSource(few, "auto")
    assert np.array_equal(source.sample_feed(few, 128)["x"], feed["x"])
    assert source.to_dict() == {"requested": "auto", "used": "proxy", "fallbacks": []}


@pytest.mark.parametrize("kind,error,cause", [
    ("proxy", "refused", "refused"),  # the inversion's own message (a batch it cannot run)
    ("auto", "bad graph", "Fail: bad graph"),  # ONNX Runtime's error from a run
])
def test_a_failed_fit_falls_back_to_the_samples_as_drawn_and_says_so(monkeypatch, kind, error,
                                                                      cause):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from onnx_udfc.core.errors import UdfcError
    from onnx_udfc.moments import inverted
    from onnx_udfc.moments.sampled import synthetic_inputs

    def refuse(*args, **kwargs):
        raise UdfcError(error) if error == "refused" else Fail(error)
    monkeypatch.setattr(inverted, "inverted_inputs", refuse)
    kept = bn_chain()
    source = MomentSource(kept, kind, sequential_pruning=True)
    drawn = proxy.proxy_inputs(kept, seed=0) if kind == "proxy" else \
        proxy.with_crops(kept, synthetic_inputs(kept, 0))
    assert np.array_equal(source.sample_feed(kept, 128)["x"], drawn["x"])
    used = source.kind
    [fallback] = source.to_dict()["fallbacks"]
    assert (fallback["from"], fallback["to"]) == (f"{used} with model inversion", used)
    assert fallback["cause"] == cause and "fit" not in source.to_dict()


def test_auto_draws_proxy_crops_beside_the_pink_noise_it_fits(monkeypatch):
    """Issue 16, fifth round: the fitted pink noise of a BN-kept network takes as many proxy
    crops beside it (ResNet-20 at 50 % +2.3 points); the batch is the noise, then the crops,
    both fitted together, and the report counts the crops."""
    from onnx_udfc.moments import inverted
    from onnx_udfc.moments.sampled import synthetic_inputs

    kept = bn_chain()
    noise = synthetic_inputs(kept, 0)["x"]
    mixed = proxy.with_crops(kept, {"x": noise})["x"]
    assert mixed.shape == (2 * len(noise), *noise.shape[1:]) and mixed.dtype == noise.dtype
    assert np.array_equal(mixed[:len(noise)], noise)
    crops = mixed[len(noise):].astype(np.float64)
    assert np.allclose(crops.mean((0, 2, 3)), 0, atol=1e-5)  # standardised like the noise
    assert np.allclose(crops.std((0, 2, 3)), 1, atol=1e-4)
    assert not np.allclose(crops, noise)

    fitted_starts = []
    real_fit = inverted.inverted_inputs

    def spy(model, steps, seed, rate, progress, start, **kwargs):
        fitted_starts.append(start)
        return real_fit(model, steps, seed, rate, progress, start=start, **kwargs)
    monkeypatch.setattr(inverted, "inverted_inputs", spy)
    source = MomentSource(kept, "auto", sequential_pruning=True)
    source.sample_feed(kept, 128)
    [start] = fitted_starts
    assert np.array_equal(start, mixed)  # the fit starts from the mixed batch
    assert source.to_dict()["proxy_crops"] == len(noise)
    source.sample_feed(kept, 128)
    assert len(fitted_starts) == 1  # asking again reads the batch already drawn

    monkeypatch.setattr(proxy, "NOISE_WITH_CROPS", False)
    plain = MomentSource(kept, "auto", sequential_pruning=True)
    plain.sample_feed(kept, 128)
    assert np.array_equal(fitted_starts[-1], noise) and "proxy_crops" not in plain.to_dict()


def test_pink_noise_beside_an_input_that_is_no_image_takes_no_crops():
    """A drawn input that is not an image keeps its batch; crops on the image input alone
    would leave the two batches different lengths."""
    b = Builder(seed=0)
    h = image(b, hw=8)
    b.output(b.relu(b.bn(b.conv(h, 3, 4), 4)))
    model = b.build()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [None, 5]))
    from onnx_udfc.moments.sampled import synthetic_inputs

    feed = synthetic_inputs(model, 0)
    assert set(feed) == {"x", "extra"} and proxy.with_crops(model, feed) is None
    assert proxy.with_crops(model, {"x": feed["x"]}) is not None


def test_proxy_reanchors_batchnorm_like_the_pink_noise():
    model = bn_chain()
    moments = MomentSource(model, "proxy").moments(model, infer_shapes(model), ["n1"],
                                                   stage="test")
    beta = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b"))
    assert np.allclose(moments["n1"].mean, beta, atol=1e-4)


def test_a_model_without_an_image_input_falls_back_to_sampled_and_says_so():
    _, report = api.compress(_conv_on([1, 3, 64]), prune=0.5, method="udfc+",
                             moments="proxy", sequential=True, target="fake")
    moments = report.to_dict()["moments"]
    assert (moments["requested"], moments["used"]) == ("proxy", "sampled")
    [fallback] = moments["fallbacks"]
    assert (fallback["from"], fallback["to"]) == ("proxy", "sampled")
    assert "no input is an image" in fallback["cause"]


def test_folded_convnet_compresses_on_proxy_moments_by_default():
    model, report = api.compress(bn_chain(with_bn=False), prune=0.3, method="udfc+", bits=8,
                                 sequential=True, target="fake")
    fit = report.moments.pop("fit")
    assert report.moments == {"requested": "auto", "used": "proxy", "fallbacks": []}
    assert (fit["batchnorms"], fit["class_prior"]) == (0, True)  # the class prior, no BN
    onnx.checker.check_model(model)
