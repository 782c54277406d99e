"""Where a run's activation moments come from, decided once per run.

The user asks for ``auto``, ``sampled``, ``proxy``, ``propagated`` or ``inverted``
(``--moments``) and may give calibration inputs. The kind is then

* ``measured`` when calibration inputs are given (:mod:`~.measured`), whatever was asked;
* ``sampled``: synthetic images through the network, BatchNorms re-anchored (:mod:`~.sampled`);
* ``proxy``: the same measurement on crops of the built-in photographs (:mod:`~.proxy`); a
  model with no image input falls back to ``sampled`` (recorded); the crops first take a few
  steps of model inversion with BatchNorm, or towards the class prior on a classifier without
  it (:func:`~.proxy.fitted_inputs`, recorded as ``fit``; a failure is recorded and the crops
  are used as they are);
* ``inverted``: the same measurement on the model-inversion batch (:mod:`~.inverted`);
* ``propagated``: the analytic propagation (:mod:`~.propagated`), which needs no run;
* ``auto``: ``proxy`` for a convolutional network that reads an image and has no BatchNorm or
  fewer than half as many as Convs (a folded export), ``sampled`` for the other convolutional
  ones (when the sequential fit prunes a BN-kept network, the pink noise, with as many proxy
  crops beside it in the batch when every drawn input is an image (recorded as
  ``proxy_crops``), first takes a few steps of model inversion, recorded as ``fit``: a
  BN-kept network that is only quantized loses nothing to plain pink noise, and the one-shot
  fit gains too little for the time),
  ``sampled`` for a graph without Conv whose MatMuls read token sequences, ``propagated``
  for a plain MLP (measured on the NM ResNet-56, ResNet-20 and LeNet-300-100, see README and
  ``docs/results/data_free.md``; the share on PP-OCRv4's detector, see :func:`folded_export`).

Sampling runs the network in ONNX Runtime on a batch, which a graph with a fixed batch size baked
into a constant refuses. The source then falls back to the propagation, records the cause, and
stays there for the rest of the run: every later stage reads the same kind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnx_udfc.config import MOMENT_SOURCES
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.core.ort import refusals
from onnx_udfc.moments import proxy
from onnx_udfc.moments.feeds import fixed_inputs, undrawn_input_cause
from onnx_udfc.moments.input_range import InputRange
from onnx_udfc.moments.measured import load_calibration, measure
from onnx_udfc.moments.propagated import TensorMoments, propagate
from onnx_udfc.moments.sampled import sampled_moments, synthetic_inputs

SAMPLING = ("sampled", "proxy", "inverted")  # the kinds that run the network on a batch
CONV_LIKE = {"BatchNormalization", "Conv", "ConvTranspose"}  # what makes ``auto`` sample
BN_SHARE = 0.5  # BatchNorms per Conv below which ``auto`` treats the export as folded


def check_request(requested: str) -> None:
    """Raise :class:`UdfcError` unless ``requested`` is one of :data:`MOMENT_SOURCES`."""
    if requested not in MOMENT_SOURCES:
        raise UdfcError(f"unknown moments source '{requested}' "
                        f"(choose {', '.join(MOMENT_SOURCES)})")


def resolve(model: onnx.ModelProto, requested: str,
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """The data-free kind ``requested`` stands for on ``model`` (``auto`` resolved;
    ``input_shapes``: the run's working shapes of dynamic inputs)."""
    if requested != "auto":
        return requested
    if not {n.op_type for n in model.graph.node} & CONV_LIKE:
        return "propagated" if feature_rows(model, input_shapes) else "sampled"
    # without a BatchNorm to re-anchor them, pink-noise activations drift: photographs do not
    if folded_export(model) and proxy.not_image_cause(model, input_shapes) is None:
        return "proxy"
    return "sampled"


def feature_rows(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> bool:
    """Whether every MatMul reads rows of features (rank 2, or a rank it cannot infer), the
    layout the propagation models with channels on axis 1: a plain MLP. A token sequence
    ``[N, T, C]`` (a transformer) is not one; the propagation has no moments for it."""
    matmuls = [n.input[0] for n in model.graph.node if n.op_type == "MatMul"]
    if not matmuls:
        return True
    try:
        shapes = infer_shapes(model, input_shapes, require_static=False)
    except UdfcError:  # no shapes: the propagation decides what it can follow
        return True
    return all(len(shapes.get(name) or (0, 0)) == 2 for name in matmuls)


def folded_export(model: onnx.ModelProto) -> bool:
    """Whether the export folded its BatchNorms into the Convs: none left, or fewer than
    :data:`BN_SHARE` per Conv (PP-OCRv4's detector keeps 3 for 64 Convs, too few to re-anchor
    the sampled activations)."""
    counts = Counter(n.op_type for n in model.graph.node)
    convs = counts["Conv"] + counts["ConvTranspose"]
    return counts["BatchNormalization"] < BN_SHARE * max(convs, 1)


class MomentSource:
    """The run's one source of activation moments (see the module docstring).

    ``kind`` is what the next request will use; ``fallbacks`` lists every switch away from the
    kind first resolved, as ``{"from", "to", "cause", "stage"}``. ``samples`` is the fitted
    model-inversion batch of ``inverted`` (synthetic samples drawn with ``seed`` without it);
    ``input_range`` (standardised when None) shapes the synthetic inputs and the propagation's
    input model;
    ``spatial``/``fit_spatial`` are the propagation's patch correlation.
    """

    def __init__(self, model: onnx.ModelProto, requested: str = "auto", *,
                 calibration: Any = None, seed: int = 0,
                 samples: dict[str, np.ndarray] | None = None,
                 input_range: InputRange | None = None,
                 spatial: float = 0.5, fit_spatial: bool = False,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 sequential_pruning: bool = False, pruning: bool = True) -> None:
        check_request(requested)
        self.requested = requested
        self.calibration = calibration
        self.seed = seed
        self.samples = samples
        self.input_range = input_range  # read (measured, when auto) by the first draw only
        self.spatial, self.fit_spatial = spatial, fit_spatial
        self.input_shapes = dict(input_shapes or {})  # the run's working shapes
        self.kind = "measured" if calibration is not None else resolve(
            model, requested, self.input_shapes)
        self.fallbacks: list[dict[str, str]] = []
        # auto, a BN-kept network, a sequential pruning repair: the pink noise takes a short
        # model inversion first (docs/results/data_free.md)
        self.fit_noise = requested == "auto" and sequential_pruning and \
            self.kind == "sampled" and not folded_export(model)  # (not folded: BNs are left)
        # the proxy crops' fit serves the pruning repair it was measured on; quantization
        # alone reads them as drawn (the fit is most of a folded ResNet-50's int8 run and left
        # quantized top-1 where it was, docs/results/data_free.md)
        self.fit_crops = pruning
        self.fit: dict[str, Any] | None = None  # how the drawn samples were fitted, if they were
        self.crops = 0  # proxy crops drawn beside the pink noise (auto's fitted noise)
        self.progress: Callable[[str], None] | None = None  # a progress bar's counter label
        self._drawn: tuple[tuple, dict[str, np.ndarray]] | None = None  # (key, feed)

    @property
    def input_mean(self) -> tuple[float, ...] | None:
        """The image input's channel mean, None when standardised."""
        r = self.input_range
        return (r.mean,) if r is not None and r.shifts else None

    @property
    def input_std(self) -> tuple[float, ...] | None:
        """The image input's channel spread, None when standardised."""
        r = self.input_range
        return (r.std,) if r is not None and r.shifts else None

    def moments(self, model: onnx.ModelProto, shapes: dict, tensors: list[str], *,
                stage: str, max_full: int = 512,
                axes: Mapping[str, int] | None = None) -> dict[str, TensorMoments]:
        """Moments of ``tensors`` of ``model`` (the model as it is at ``stage``, which names
        the stage in a fallback record). ``max_full``: the propagation keeps full covariances
        of tensors with at most this many channels. ``axes``: channel axes other than 1, for
        the measured and sampled kinds (the propagation models channels on axis 1)."""
        if self.kind == "measured":
            return measure(model, self.calibration, tensors, axes=axes)
        if self.kind in SAMPLING:
            sampled = self._sample(model, shapes, tensors, stage, axes)
            if sampled is not None:
                return sampled
        return propagate(model, shapes, spatial=self.spatial, fit_spatial=self.fit_spatial,
                         max_full=max_full, input_mean=self.input_mean,
                         input_std=self.input_std, keep=tensors)

    @property
    def anchored(self) -> bool:
        """Whether the network runs with its BatchNorms re-anchored to each batch (drawn
        inputs; real ones, and the proxy photographs when :data:`~.proxy.ANCHOR_BN` is off,
        run the network as it is)."""
        return self.kind != "measured" and (self.kind != "proxy" or proxy.ANCHOR_BN)

    @property
    def refit_kept(self) -> bool:
        """Whether the sequential fit refits the kept channels too (on real inputs, and on the
        proxy photographs when :data:`~.proxy.REFIT_KEPT` is on)."""
        return self.kind == "measured" or (self.kind == "proxy" and proxy.REFIT_KEPT)

    def sample_feed(self, model: onnx.ModelProto, limit: int,
                    stage: str = "compensate") -> dict[str, np.ndarray]:
        """Inputs to run the network on: the first ``limit`` calibration inputs, else the
        inversion batch, else proxy or synthetic samples. :class:`UdfcError` when an input
        cannot be drawn."""
        if self.calibration is not None:
            fixed = fixed_inputs(model)
            return {k: v if k in fixed else v[:limit]
                    for k, v in load_calibration(self.calibration, model).items()}
        feed, cause = self._drawn_feed(model, stage)
        if cause is not None:
            raise UdfcError(cause)
        return feed

    def to_dict(self) -> dict[str, Any]:
        """For the report: what was asked, what is used, and why it changed."""
        described: dict[str, Any] = {"requested": self.requested, "used": self.kind,
                                     "fallbacks": [dict(f) for f in self.fallbacks]}
        if self.fit is not None and self.kind in ("proxy", "sampled"):
            described["fit"] = dict(self.fit)
        if self.crops and self.kind == "sampled":
            described["proxy_crops"] = self.crops
        return described

    def _sample(self, model: onnx.ModelProto, shapes: dict, tensors: list[str],
                stage: str, axes: Mapping[str, int] | None = None
                ) -> dict[str, TensorMoments] | None:
        """Sampled moments, or None after falling back (recorded) when the run is refused."""
        feed, cause = self._drawn_feed(model, stage)
        if cause is not None:
            self.fall_back(stage, cause)
            return None
        try:
            if not self.anchored:
                return measure(model, feed, tensors, axes=axes)
            return sampled_moments(model, tensors, shapes, feed=feed, axes=axes)
        except refusals() as exc:
            self.fall_back(stage, refusal_cause(exc))
            return None

    def _drawn_feed(self, model: onnx.ModelProto, stage: str
                    ) -> tuple[dict[str, np.ndarray], str | None]:
        """The inversion batch, proxy or synthetic samples, and why they cannot run ``model``.
        ``proxy`` on a model without an image input switches to ``sampled`` (recorded).
        Drawn samples are drawn once per input signature: the stages of a run (and the
        compressed model, which keeps its inputs) read the same ones."""
        if self.samples is not None:
            return self.samples, undrawn_input_cause(model, self.samples)
        if self.kind == "proxy":
            cause = proxy.not_image_cause(model, self.input_shapes)
            if cause is not None:
                self.fallbacks.append({"from": "proxy", "to": "sampled", "cause": cause,
                                       "stage": stage})
                self.kind = "sampled"
        key = (self.kind, _input_signature(model))
        if self._drawn is None or self._drawn[0] != key:
            if self.kind == "proxy":
                feed = proxy.proxy_inputs(model, self.seed, self.input_mean, self.input_std,
                                          self.input_shapes)
                if self.fit_crops:
                    feed = self._fitted(model, feed, stage)
            else:
                feed = synthetic_inputs(model, self.seed, self.input_mean, self.input_std,
                                        self.input_shapes)
                if self.fit_noise and self.kind == "sampled":
                    mixed = proxy.with_crops(model, feed, self.seed, self.input_mean,
                                             self.input_std, self.input_shapes) \
                        if proxy.NOISE_WITH_CROPS else None
                    if mixed is not None:
                        self.crops = sum(len(mixed[k]) - len(feed[k]) for k in feed)
                    feed = self._fitted(model, mixed or feed, stage)
            self._drawn = (key, feed)
        feed = self._drawn[1]
        return feed, undrawn_input_cause(model, feed)

    def _fitted(self, model: onnx.ModelProto, feed: dict[str, np.ndarray],
                stage: str) -> dict[str, np.ndarray]:
        """The drawn samples (proxy crops, or pink noise under :attr:`fit_noise`) fitted to
        the network (:func:`~.proxy.fitted_inputs`, recorded in :attr:`fit`), else as they
        are, the cause recorded."""
        try:
            label = self.progress
            tick = None if label is None else \
                lambda step, steps, loss: label(f"fit samples {step}/{steps}")
            fitted, self.fit = proxy.fitted_inputs(model, feed, self.seed, self.input_shapes,
                                                   batchnorm=not folded_export(model),
                                                   progress=tick)
            return fitted
        except refusals() as exc:  # a refused batch or gradient graph: the samples as drawn
            self.fit_noise = False  # one refusal is enough: later draws take the noise as is
            what = "class prior" if folded_export(model) else "model inversion"
            cause = str(exc) if isinstance(exc, UdfcError) else refusal_cause(exc)
            self.fallbacks.append({"from": f"{self.kind} with {what}", "to": self.kind,
                                   "cause": cause, "stage": stage})
            return feed

    def fall_back(self, stage: str, cause: str, failed: str | None = None) -> None:
        """Switch to the propagation for the rest of the run, recording why ``failed`` (by
        default the current kind; ``sequential`` for the sequential fit's run)."""
        self.fallbacks.append({"from": failed or self.kind, "to": "propagated", "cause": cause,
                               "stage": stage})
        self.kind = "propagated"


def _input_signature(model: onnx.ModelProto) -> tuple:
    """What :func:`synthetic_inputs` draws from: every graph input's name, type and shape."""
    return tuple((i.name, i.type.SerializeToString()) for i in model.graph.input), \
        tuple(sorted(fixed_inputs(model)))


def refusal_cause(exc: BaseException) -> str:
    """A caught :func:`~onnx_udfc.core.ort.refusals` error as a fallback cause."""
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else "no message"
