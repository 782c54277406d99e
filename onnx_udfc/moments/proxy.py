"""Data-free moments from a built-in proxy image set (``--moments proxy``).

Synthetic pink noise carries no statistics of real images past its spectrum; on a BN-folded
network nothing re-anchors the activations it produces (:mod:`~.sampled`). Real photographs
do, even out of the user's domain: cross-domain calibration is stable across tasks ("Is
In-Domain Data Really Needed?", arXiv 2105.07331). The package ships a few public-domain / CC0
photographs (``proxy_images/``, sources and licenses in ``proxy_images/LICENSES.md``; built by
``tools/make_proxy_images.py``) as a numpy archive, so no image decoder is needed at run time.

Each sample is a random crop (area and aspect jittered), flipped half the time, colour-jittered
(brightness, contrast, saturation) and resized to the model's input with numpy/scipy only.
Colour inputs draw from the colour photographs, one-channel inputs from every photograph in
grey. The preprocessing the model expects is unknown, so every channel of the batch is
standardised to mean 0, variance 1: ImageNet- and CIFAR-style normalisation brings natural
images close to that (``input_mean``/``input_std`` then shift and scale it, as for the pink
noise). An input that is not an image (rank 4, 1 or 3 channels, sides >= 8) gets what
:func:`~.sampled.synthetic_inputs` gives it.

When the run removes channels, the crops are then fitted a few Adam steps towards what the
network remembers of its training data (:func:`fitted_inputs`, the gradient from
:mod:`~.inverted`; quantization alone reads them as drawn, see
:class:`~.source.MomentSource`):

* without BatchNorm nothing re-anchors what the crops do inside the network; a classifier's
  crops take :data:`PRIOR_STEPS` steps of :data:`PRIOR_LEARNING_RATE` towards DeepInversion's
  class prior alone (cross-entropy to class ``i mod K`` for sample ``i``). A few small steps
  make the crops look like the training classes to the network without leaving the
  photographs; more or larger steps fit the prior too well;
* an export that folded most of its BatchNorms but kept a few (PP-OCRv4's detector) takes no
  step: too few BNs to invert against, and no class prior measured there;
* with BatchNorm the crops take :data:`BN_FIT_STEPS` steps of :data:`BN_FIT_LEARNING_RATE`
  of model inversion (every BN's batch mean and variance towards its running statistics, plus
  the class prior on a classifier): the full inversion's loss (:mod:`~.inverted`, 300 steps)
  for a few steps. ``auto`` runs the same short inversion on the pink noise of
  :mod:`~.sampled` when the sequential fit prunes a BN-kept network: the photographs are out
  of domain for some tasks (rendered text), the network's own statistics are not. As many
  crops go beside that noise into the same batch (:func:`with_crops`,
  :data:`NOISE_WITH_CROPS`): alone, the crops win on some networks and the noise on others;
  the batch of both read as the better of the two on every CIFAR cell measured.

Both measured in ``docs/results/data_free.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import graph_inputs
from onnx_udfc.moments.feeds import fixed_inputs
from onnx_udfc.moments.sampled import in_range, sample_count, synthetic_inputs

IMAGES = Path(__file__).resolve().parent / "proxy_images" / "proxy_images.npz"
CROP_AREA = (0.25, 1.0)  # share of the source image a crop covers
CROP_ASPECT = (3 / 4, 4 / 3)  # crop aspect ratio relative to the input's
JITTER = 0.3  # brightness, contrast and saturation factors drawn from 1 +- JITTER
MIN_SIDE = 8  # smaller spatial inputs are not treated as images
LUMA = np.array([0.299, 0.587, 0.114])
# images per batch, and pixels per batch at most (an image of 181 x 181 or more takes the
# minimum of 8 either way): 256 small crops instead of 128 gained 0.2-2.2 points on the folded
# CIFAR ResNets for twice the time (docs/results/data_free.md, fourth round)
SAMPLES, POSITIONS = 256, 1 << 18
GREY_IN_COLOUR = False  # colour inputs also draw the grey photographs (as grey RGB)
UNIT_RANGE = False  # pixels in [0, 1] instead of standardised channels
ANCHOR_BN = True  # BatchNorms re-anchored to each proxy batch, as for the pink noise
REFIT_KEPT = False  # the sequential fit refits the pruned channels only, as for the pink noise
PRIOR_STEPS = 10  # class-prior steps on the crops of a graph without BatchNorm (0: none)
PRIOR_LEARNING_RATE = 0.02  # Adam step of those, on standardised pixels
BN_FIT_STEPS = 10  # inversion steps on the crops (and auto's pink noise) of a BN graph (0: none)
BN_FIT_LEARNING_RATE = 0.1  # Adam step of those, on standardised pixels
# auto's pink noise (a BN-kept network pruned by the sequential fit) takes as many crops beside
# it before the fit: ResNet-20 at 50 % +2.3 points, the other CIFAR cells within seed noise
# (docs/results/data_free.md, fifth round)
NOISE_WITH_CROPS = True


@functools.lru_cache(maxsize=1)
def proxy_images() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(colour ``(H, W, 3)``, grey ``(H, W)``) photographs as float in [0, 1]; the grey ones
    include every colour photograph in grey."""
    with np.load(IMAGES) as npz:
        arrays = [npz[k].astype(np.float64) / 255.0 for k in sorted(npz.files)]
    colour = tuple(a for a in arrays if a.ndim == 3)
    grey = tuple(a if a.ndim == 2 else a @ LUMA for a in arrays)
    return colour, grey


def image_inputs(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """The sample inputs that look like images: static ``(N, C, H, W)`` (``input_shapes``, the
    run's working shapes, fixing dynamic sizes), C 1 or 3, H and W at least :data:`MIN_SIDE`
    (the batch dimension may be free)."""
    fixed = fixed_inputs(model)
    shapes = input_shapes or {}
    found = {}
    for inp in graph_inputs(model):
        dims = list(shapes[inp.name]) if inp.name in shapes else [
            d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
        if inp.name not in fixed and len(dims) == 4 and dims[1] in (1, 3) \
                and min(dims[2:]) >= MIN_SIDE:
            found[inp.name] = dims
    return found


def not_image_cause(model: onnx.ModelProto,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """Why the proxy images cannot feed ``model`` (no input is an image), or None."""
    if image_inputs(model, input_shapes):
        return None
    return "no input is an image (N, C, H, W) with 1 or 3 channels and sides of at least " \
        f"{MIN_SIDE}: synthetic samples instead of the proxy images"


def crop_resize(image: np.ndarray, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``image`` (``(H, W)`` or ``(H, W, C)``) resized to ``height x width``
    (bilinear, low-pass filtered first when shrinking), flipped left-right half the time."""
    src_h, src_w = image.shape[:2]
    area = rng.uniform(*CROP_AREA) * src_h * src_w
    aspect = width / height * np.exp(rng.uniform(*np.log(CROP_ASPECT)))
    crop_h = min(src_h, np.sqrt(area / aspect))
    crop_w = min(src_w, crop_h * aspect)
    top, left = rng.uniform(0, src_h - crop_h), rng.uniform(0, src_w - crop_w)
    rows = top + (np.arange(height) + 0.5) * crop_h / height - 0.5
    cols = left + (np.arange(width) + 0.5) * crop_w / width - 0.5
    if rng.random() < 0.5:
        cols = cols[::-1]
    grid = np.meshgrid(rows, cols, indexing="ij")
    shrink = (crop_h / height, crop_w / width)
    sigma = [max(0.0, (s - 1) / 2) for s in shrink]  # anti-aliasing before sampling
    from scipy import ndimage  # imported on use: it adds 0.1 s to every run's start

    planes = image[..., None] if image.ndim == 2 else image
    out = [ndimage.map_coordinates(ndimage.gaussian_filter(planes[..., c], sigma), grid,
                                   order=1, mode="reflect") for c in range(planes.shape[-1])]
    return np.stack(out)


def jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` (``(C, H, W)`` in [0, 1]) with random brightness, contrast and (colour only)
    saturation, clipped to [0, 1]."""
    brightness, contrast, saturation = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    x = x * brightness
    grey = np.tensordot(LUMA, x, 1) if len(x) == 3 else x[0]
    x = (x - grey.mean()) * contrast + grey.mean()
    if len(x) == 3:
        grey = np.tensordot(LUMA, x, 1)
        x = grey + (x - grey) * saturation
    return np.clip(x, 0.0, 1.0)


def proxy_batch(n: int, channels: int, height: int, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """``(n, channels, height, width)`` augmented proxy crops in [0, 1]."""
    colour, grey = proxy_images()
    if GREY_IN_COLOUR:
        colour = colour + tuple(np.repeat(g[..., None], 3, -1) for g in grey)
    pool = colour if channels == 3 else grey
    return np.stack([jitter(crop_resize(pool[rng.integers(len(pool))], height, width, rng), rng)
                     for _ in range(n)])


def standardise(x: np.ndarray, input_mean: float | Sequence[float] | None,
                input_std: float | Sequence[float] | None) -> np.ndarray:
    """Every channel of the batch to mean 0, variance 1, then scaled by ``input_std`` and
    shifted by ``input_mean`` when given."""
    x = (x - x.mean((0, 2, 3), keepdims=True)) / (x.std((0, 2, 3), keepdims=True) + 1e-12)
    return in_range(x, input_mean, input_std)


def proxy_inputs(model: onnx.ModelProto, seed: int = 0,
                 input_mean: tuple[float, ...] | None = None,
                 input_std: tuple[float, ...] | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, np.ndarray]:
    """:func:`~.sampled.synthetic_inputs` with every image input (:func:`image_inputs`) drawn
    from the proxy set instead, standardised (:func:`standardise`)."""
    feed = synthetic_inputs(model, seed, input_mean, input_std, input_shapes)
    rng = np.random.default_rng(seed)
    for name, dims in image_inputs(model, input_shapes).items():
        feed[name] = _crops(sample_count(dims, SAMPLES, POSITIONS), dims, rng, input_mean,
                            input_std).astype(np.float32)
    return feed


def _crops(n: int, dims: Sequence[int], rng: np.random.Generator,
           input_mean: tuple[float, ...] | None, input_std: tuple[float, ...] | None
           ) -> np.ndarray:
    """``n`` crops for an image input of shape ``dims``, standardised unless
    :data:`UNIT_RANGE`."""
    x = proxy_batch(n, *dims[1:], rng)
    return x if UNIT_RANGE else standardise(x, input_mean, input_std)


def with_crops(model: onnx.ModelProto, feed: dict[str, np.ndarray], seed: int = 0,
               input_mean: tuple[float, ...] | None = None,
               input_std: tuple[float, ...] | None = None,
               input_shapes: Mapping[str, Sequence[int]] | None = None
               ) -> dict[str, np.ndarray] | None:
    """``feed`` (the pink noise of :func:`~.sampled.synthetic_inputs`) with as many proxy crops
    appended to each image input's batch, standardised like them (:func:`standardise`); None
    when a drawn input is not an image (its batch would no longer line up with the others')."""
    images = image_inputs(model, input_shapes)
    fixed = fixed_inputs(model)
    drawn = [name for name in feed if name not in fixed]
    if not drawn or any(name not in images for name in drawn):
        return None
    rng = np.random.default_rng(seed)
    mixed = dict(feed)
    for name in drawn:
        noise = feed[name]
        crops = _crops(len(noise), images[name], rng, input_mean, input_std)
        mixed[name] = np.concatenate([noise, crops.astype(noise.dtype)])
    return mixed


def has_batchnorm(model: onnx.ModelProto) -> bool:
    """Whether any BatchNormalization is left in ``model``'s graph."""
    return any(n.op_type == "BatchNormalization" for n in model.graph.node)


def fitted_inputs(model: onnx.ModelProto, feed: dict[str, np.ndarray], seed: int = 0,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  batchnorm: bool = False,
                  progress: Callable[[int, int, float], None] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict | None]:
    """``feed`` (:func:`proxy_inputs`, or the pink noise of
    :func:`~.sampled.synthetic_inputs`) with its first float input fitted as the module
    docstring says, and the fit's :meth:`~.inverted.Inversion.summary`. ``batchnorm``: the
    graph keeps its BatchNorms (model inversion); else a graph without any BatchNorm takes the
    class prior, and one that kept a few (a folded export) is left as it is, as is one without a
    ``[N, K]`` class output: ``(feed, None)``, as when the steps are set to 0.
    ``progress(step, steps, loss)`` is called after every step.
    :class:`~onnx_udfc.core.errors.UdfcError` when the first float input has no samples in
    ``feed`` or ONNX Runtime refuses the batch."""
    from onnx_udfc.core.precision import float32_copy
    from onnx_udfc.moments.inverted import has_class_output, inverted_inputs

    model = float32_copy(model)  # a float16 model is fitted in float32, as the inversion does
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    steps, rate = (BN_FIT_STEPS, BN_FIT_LEARNING_RATE) if batchnorm \
        else (PRIOR_STEPS, PRIOR_LEARNING_RATE)
    if not steps or not batchnorm and (has_batchnorm(model)
                                       or not has_class_output(model, shapes)):
        return feed, None
    first = next((i.name for i in graph_inputs(model)
                  if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT), None)
    if first not in feed:
        raise UdfcError("the fit moves the first float input, which has no drawn samples")
    fitted = inverted_inputs(model, steps, seed, rate, progress, start=feed[first],
                             input_shapes=shapes, class_only=not batchnorm)
    return {**feed, first: fitted.feed[first].astype(feed[first].dtype)}, fitted.summary()
