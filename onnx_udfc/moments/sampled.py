"""Data-free moments by sampling: synthetic inputs through the real network, every
BatchNormalization re-anchored to its own running statistics (``--moments sampled``).

The analytic propagation (:mod:`~.propagated`) gets each channel's marginal right where a
BatchNorm anchors it, but has to *model* how channels co-vary: a Gaussian activation model and a
fixed correlation between the positions of a patch. Here nothing is modelled past the input.
Smooth random images (a ``1/f`` amplitude spectrum, like natural images; white Gaussian vectors
for non-image inputs) run through the network in ONNX Runtime with each BatchNormalization in
*training* form: it normalises its input by the batch's own per-channel mean and variance, then
applies gamma and beta. Every BN output therefore has exactly the mean ``beta`` and spread
``|gamma|`` it had on the training data, while the cross-channel and spatial structure comes
from the real weights and activations. The same measurement code as ``--calibration``
(:func:`onnx_udfc.moments.measured.measure`) reads the moments off.

Without BatchNorm (a folded export) nothing re-anchors the marginals: the samples then only
carry the input model through the network, like the propagation does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_udfc.core.graph_edit import Patch
from onnx_udfc.core.io import graph_inputs, opset_version
from onnx_udfc.moments.feeds import fixed_inputs, fixed_value
from onnx_udfc.moments.propagated import TensorMoments

SAMPLES = 128  # images (fewer for large inputs, see sample_count)
POSITIONS = 1 << 17  # input positions (images x pixels) to aim for
COLOR_CORRELATION = 0.8  # between the colour channels of a natural image


def pink_noise(shape: tuple[int, ...], rng: np.random.Generator,
               color_correlation: float = COLOR_CORRELATION) -> np.ndarray:
    """``(N, C, H, W)`` images with a ``1/f`` amplitude spectrum, each channel of the batch
    standardised to mean 0, variance 1, channels correlated by ``color_correlation``."""
    n, c = shape[:2]
    spatial = shape[2:]
    freqs = np.meshgrid(*[np.fft.fftfreq(s) for s in spatial], indexing="ij")
    radius = np.sqrt(sum(f ** 2 for f in freqs))
    radius.flat[0] = 1.0
    amp = 1.0 / radius
    amp.flat[0] = 0.0

    def field(k: int) -> np.ndarray:
        noise = rng.standard_normal((n, k, *spatial))
        axes = tuple(range(2, 2 + len(spatial)))
        return np.real(np.fft.ifftn(np.fft.fftn(noise, axes=axes) * amp, axes=axes))

    shared = field(1)
    x = np.sqrt(color_correlation) * shared + np.sqrt(1 - color_correlation) * field(c)
    axes = (0, *range(2, x.ndim))
    x = (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-12)
    return x


def sample_count(dims: list[int], samples: int = SAMPLES, positions: int = POSITIONS) -> int:
    """Images per batch: ``samples`` small ones, fewer large ones (at least 8), so that the
    batch holds at most ``positions`` pixels."""
    pixels = int(np.prod(dims[2:])) if len(dims) > 2 else 1
    return int(max(8, min(samples, positions // max(pixels, 1))))


def in_range(x: np.ndarray, input_mean: float | Sequence[float] | None,
             input_std: float | Sequence[float] | None) -> np.ndarray:
    """Standardised images ``(N, C, ...)`` moved to a channel ``input_mean`` and spread
    ``input_std`` (one value, or one per channel; :mod:`onnx_udfc.moments.input_range`)."""
    if input_mean is None and input_std is None:
        return x
    c = x.shape[1]
    bshape = (1, c) + (1,) * (x.ndim - 2)
    mean = np.broadcast_to(np.asarray(0.0 if input_mean is None else input_mean, float)
                           .reshape(-1), (c,)).reshape(bshape)
    std = np.broadcast_to(np.asarray(1.0 if input_std is None else input_std, float)
                          .reshape(-1), (c,)).reshape(bshape)
    return x * std + mean


def synthetic_inputs(model: onnx.ModelProto, seed: int = 0,
                     input_mean: tuple[float, ...] | None = None,
                     input_std: tuple[float, ...] | None = None,
                     input_shapes: Mapping[str, Sequence[int]] | None = None
                     ) -> dict[str, np.ndarray]:
    """A feed of synthetic inputs for every input of static shape (batch dimension free),
    ``input_shapes`` (the run's working shapes) fixing dynamic ones; image-like inputs (rank
    >= 3, spatial size >= 4) get pink noise, :func:`fixed_inputs` their :func:`fixed_value`.
    An input with a free dimension past the batch gets nothing."""
    rng = np.random.default_rng(seed)
    fixed = fixed_inputs(model)
    shapes = input_shapes or {}
    feed = {}
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        dims = list(shapes[inp.name]) if inp.name in shapes else [
            d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if inp.name in fixed:
            if all(d > 0 for d in dims):
                feed[inp.name] = fixed_value(dims, tt.elem_type, rng)
            continue
        if not dims or any(d <= 0 for d in dims[1:]):
            continue
        n = sample_count(dims)
        shape = (n, *dims[1:])
        if len(dims) >= 3 and min(dims[2:]) >= 4:
            x = in_range(pink_noise(shape, rng), input_mean, input_std)
        else:
            x = rng.standard_normal(shape)
        feed[inp.name] = x.astype(np.float32)
    return feed


def training_batchnorm(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose BatchNormalization nodes normalise by batch statistics
    (``shapes``: tensor name -> shape, for the rank of each BN's input; 4 when unknown). The
    batch mean and variance of the BN writing ``y`` are ``y__bnstat_mu`` and ``y__bnstat_var``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    opset = opset_version(out)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.op_type != "BatchNormalization" or not all(n in inits for n in node.input[1:3]):
            nodes.append(node)
            continue
        known = (shapes or {}).get(node.input[0])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[node.input[1]].data_type)
        patch_nodes, constants = _batch_normalization(node, len(known) if known else 4, opset,
                                                      dtype)
        nodes += patch_nodes
        out.graph.initializer.extend(constants)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _batch_normalization(node: onnx.NodeProto, rank: int, opset: int, dtype: np.dtype
                         ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and constants replacing the BN ``node`` (input of rank ``rank``, channel axis
    1, float type ``dtype``): its input normalised by its own mean and variance over all the
    other axes."""
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    x, gamma, beta = node.input[0], node.input[1], node.input[2]
    p = f"{node.output[0]}__bnstat"
    axes = [0, *range(2, rank)]
    patch = Patch(opset)
    eps_name = patch.constant(f"{p}_eps", np.asarray(eps, dtype))
    bshape = patch.constant(f"{p}_bshape", np.asarray([1, -1] + [1] * (rank - 2), np.int64))
    patch.reduce_to("ReduceMean", x, axes, f"{p}_mu", f"{p}_axes")
    patch.node("Sub", [x, f"{p}_mu"], [f"{p}_xc"])
    patch.node("Mul", [f"{p}_xc", f"{p}_xc"], [f"{p}_sq"])
    patch.reduce_to("ReduceMean", f"{p}_sq", axes, f"{p}_var", f"{p}_axes")
    patch.node("Add", [f"{p}_var", eps_name], [f"{p}_ve"])
    patch.node("Sqrt", [f"{p}_ve"], [f"{p}_sd"])
    patch.node("Div", [f"{p}_xc", f"{p}_sd"], [f"{p}_n"])
    patch.node("Reshape", [gamma, bshape], [f"{p}_g"])
    patch.node("Reshape", [beta, bshape], [f"{p}_b"])
    patch.node("Mul", [f"{p}_n", f"{p}_g"], [f"{p}_ng"])
    patch.node("Add", [f"{p}_ng", f"{p}_b"], [node.output[0]])
    return patch.export()


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (edited in place) with the first dimension of every input and output free, so
    a model exported with a fixed batch of 1 can take a batch of samples; a graph that bakes
    the batch size into a constant then fails in ONNX Runtime (callers fall back). The
    :func:`fixed_inputs` keep their shape."""
    fixed = fixed_inputs(model)
    samples = [i for i in graph_inputs(model) if i.name not in fixed]
    for vi in samples + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "udfc_batch"
    return model


def sampled_moments(model: onnx.ModelProto, tensors: list[str], shapes: dict | None = None,
                    seed: int = 0,
                    input_mean: tuple[float, ...] | None = None,
                    input_std: tuple[float, ...] | None = None,
                    feed: dict[str, np.ndarray] | None = None,
                    axes: Mapping[str, int] | None = None) -> dict[str, TensorMoments]:
    """Moments of ``tensors`` measured on synthetic inputs (``feed``, pink noise by default)
    with re-anchored BatchNorms (``axes``: channel axes other than 1)."""
    from onnx_udfc.moments.measured import measure

    if feed is None:
        feed = synthetic_inputs(model, seed, input_mean, input_std)
    return measure(free_batch(training_batchnorm(model, shapes)), feed, tensors, copy=False,
                   axes=axes)
