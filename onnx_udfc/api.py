"""The public Python API: ``compress`` and the composable passes it is made of.

Example::

    from onnx_udfc import api
    model, report = api.compress("models/digits_cnn_bn.onnx", prune=0.3)
    api.save(model, "digits_pruned.onnx")

    # or step by step
    model = api.load("models/digits_cnn_bn.onnx")
    api.normalize(model)
    analysis = api.analyse(model)
    plan = api.plan(analysis, ratio=0.5, criterion="l2")
    api.reconstruct(analysis, plan, method="udfc")
    api.prune(analysis, plan)
    api.quantize(model, bits=6)
    api.check(model)
    print(api.verify("models/digits_cnn_bn.onnx", model, data="models/digits_test.npz"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_udfc.channels.analysis import ChannelAnalysis, ChannelGroup
from onnx_udfc.channels.analysis import analyse as _analyse
from onnx_udfc.channels.plan import PruneConfig, PrunePlan, make_plan
from onnx_udfc.channels.rewrite import apply_removal
from onnx_udfc.core import io as _io
from onnx_udfc.core import normalize as _normalize
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.methods.compensate import MethodConfig, compensate_pruning, quantize_model
from onnx_udfc.ops.cost import count_params, layer_stats
from onnx_udfc.quant.bn_scales import fold_bn_into_scales
from onnx_udfc.quant.grids import QuantizedWeight
from onnx_udfc.quant.qdq import StorageConfig, fake_summary, to_qdq
from onnx_udfc.report.report import Report, build_report

load = _io.load_model
save = _io.save_model
check = _io.check_model
fold_batchnorm = _normalize.fold_batchnorm


def normalize(model: onnx.ModelProto) -> dict[str, int]:
    """Constants and Identity-aliased weights become initializers; shape arithmetic is folded.

    >>> counts = normalize(model)   # {'constants': 40, 'identities': 0, 'folded': 40, ...}
    """
    return _normalize.normalize(model)


@dataclass
class Analysis:
    """The channel analysis of a model with its groups."""

    channels: ChannelAnalysis
    groups: list[ChannelGroup]
    shapes: dict

    @property
    def model(self) -> onnx.ModelProto:
        return self.channels.model


def analyse(model: onnx.ModelProto,
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> Analysis:
    """Channel groups of a normalised model.

    >>> a = analyse(model)
    >>> [(g.size, g.prunable, g.coupled) for g in a.groups][:2]
    """
    shapes = _io.infer_shapes(model, input_shapes)
    channels = _analyse(model, shapes)
    return Analysis(channels, channels.groups(), shapes)


def plan(analysis: Analysis, ratio: float = 0.0, **options) -> PrunePlan:
    """Choose the channels to remove: ``ratio`` per group, plus :class:`PruneConfig` options
    (``criterion``, ``exclude``, ``prune_coupled``, ``round_to``, ``group_ratios``).

    >>> p = plan(a, 0.5, criterion="l2", exclude=[r"layer3"])
    """
    return make_plan(analysis.channels, analysis.groups, PruneConfig(ratio=ratio, **options))


def reconstruct(analysis: Analysis, pruning: PrunePlan, method: str = "udfc",
                alpha1: float = 0.01,
                folded: dict[str, _normalize.BatchNormStats] | None = None) -> dict[str, dict]:
    """Fold the reconstruction of every planned channel into the layers that read it (Eq. 8);
    call before :func:`prune`. ``method`` is ``udfc`` (Eq. 20) or ``nm`` (Neuron Merging);
    ``folded`` are the statistics :func:`fold_batchnorm` returned. Returns per-layer entries
    (``compensated``, ``reason``, ``predicted_error``, ...).

    >>> info = reconstruct(a, p, "udfc"); prune(a, p)
    """
    config = MethodConfig(method=method, alpha1=alpha1)
    config.validate()
    return compensate_pruning(analysis.channels, pruning.removed, config, folded)


def prune(analysis: Analysis, pruning: PrunePlan) -> None:
    """Physically remove the planned channels from the model (in place).

    >>> prune(a, p); check(a.model)
    """
    apply_removal(analysis.channels, pruning.removed)


def quantize(model: onnx.ModelProto, bits: int, method: str = "udfc", quantizer: str = "paper",
             granularity: str = "tensor", alpha2: float = 0.008,
             input_shapes: Mapping[str, Sequence[int]] | None = None,
             folded: dict[str, _normalize.BatchNormStats] | None = None,
             exclude: Sequence[str] = ()) -> dict[str, dict]:
    """Fake-quantize every weight layer in graph order (in place); with ``method="udfc"`` each
    layer's Eq. 21 scales go into the layers that read it. Returns per-layer entries.

    >>> info = quantize(model, 6, quantizer="symmetric", granularity="channel")
    """
    config = MethodConfig(method=method, bits=bits, quantizer=quantizer,
                          granularity=granularity, alpha2=alpha2)
    config.validate()
    return quantize_model(model, config, dict(input_shapes) if input_shapes else None, folded,
                          list(exclude))


def verify(original: _io.ModelSource, compressed: _io.ModelSource, **options):
    """Compare two models in ONNX Runtime (see :func:`onnx_udfc.report.verify.verify`).

    >>> result = verify("a.onnx", model, data="inputs.npz")
    >>> result.fidelity[0].cosine, result.accuracy_after
    """
    from onnx_udfc.report.verify import verify as _verify

    return _verify(original, compressed, **options)


@dataclass
class CompressOptions:
    prune: float = 0.0
    criterion: str = "l1"
    exclude: list[str] = field(default_factory=list)
    prune_coupled: bool = False
    round_to: int = 1
    fold_bn: bool = False
    input_shapes: dict[str, list[int]] | None = None
    method: str = "prune"
    bits: int | None = None
    quantizer: str = "paper"
    granularity: str = "tensor"
    alpha1: float = 0.01
    alpha2: float = 0.008
    quant_exclude: list[str] = field(default_factory=list)
    format: str = "fake"
    block_size: int | None = None
    container: str = "auto"
    opset: int | None = None
    moments: str = "auto"
    sequential: bool = False
    seed: int = 0


def compress(model: _io.ModelSource, *, prune: float = 0.0, criterion: str = "l1",
             exclude: Sequence[str] = (), prune_coupled: bool = False, round_to: int = 1,
             fold_bn: bool = False, input_shapes: Mapping[str, Sequence[int]] | None = None,
             progress: Callable[[str], None] | None = None, check: bool = True,
             method: str = "prune", bits: int | None = None, quantizer: str = "paper",
             granularity: str = "tensor", alpha1: float = 0.01, alpha2: float = 0.008,
             quant_exclude: Sequence[str] = (), calibration: object = None,
             format: str = "fake", block_size: int | None = None, container: str = "auto",
             opset: int | None = None, budget_flops: float | None = None,
             fold_bn_scales: bool = False, moments: str = "auto", sequential: bool = False,
             seed: int = 0) -> tuple[onnx.ModelProto, Report]:
    """Load, analyse, plan, compensate, prune, quantize and check; returns the compressed model
    and its report.

    ``method``: ``prune`` (no compensation), ``nm`` (Neuron Merging) or ``udfc`` (the paper:
    Eq. 20 reconstruction of pruned channels, Eq. 21 scales for quantized ones). ``bits``
    (2..8) fake-quantizes every weight layer with ``quantizer`` (paper, symmetric,
    asymmetric) at ``granularity`` (tensor, channel); layers whose name matches ``exclude`` or
    ``quant_exclude`` stay in float. ``method="udfc+"``: reconstruction and bias correction
    from a model of the activation moments (:mod:`onnx_udfc.methods.plus`), measured on
    ``calibration`` inputs (array, dict or ``.npz``) when given, else on synthetic samples
    drawn with ``seed`` (the start of the inversion too, ``moments="inverted"``).

    ``block_size``: block-wise scales, one per ``block_size`` input channels (overrides
    ``granularity``). ``format="qdq"`` stores the quantized weights as integers read by
    ``DequantizeLinear`` (:mod:`onnx_udfc.quant.qdq`): int4/uint4 for bits <= 4 unless
    ``container="int8"``, the opset raised to ``opset`` or to what the storage needs.

    A ``ModelProto`` argument is copied, never modified. Raises :class:`UdfcError` on bad
    input before anything is changed. ``check=False`` skips the in-memory ``onnx.checker`` run
    (the CLI checks the written file instead, see :func:`save_compressed`).

    >>> model, report = compress("models/digits_cnn_bn.onnx", prune=0.3)
    >>> report.params_after < report.params_before
    True
    """
    options = CompressOptions(prune, criterion, list(exclude), prune_coupled, round_to, fold_bn,
                              dict(input_shapes) if input_shapes else None, method, bits,
                              quantizer, granularity, alpha1, alpha2, list(quant_exclude),
                              format, block_size, container, opset, moments, sequential, seed)
    PruneConfig(ratio=prune, criterion=criterion, exclude=list(exclude),
                round_to=round_to).validate()
    method_config = MethodConfig(method, bits, quantizer, granularity, alpha1, alpha2,
                                 calibration=calibration, block_size=block_size,
                                 moments=moments, sequential=sequential, seed=seed)
    method_config.validate()
    storage_config = StorageConfig(format, container, opset)
    if fold_bn_scales and format != "qdq":
        raise UdfcError("--fold-bn-scales needs --format qdq (it folds BatchNormalization into "
                        "the integer weights' scales)")
    storage_config.validate(bits, quantizer, granularity, block_size)
    PruneConfig(exclude=list(quant_exclude)).validate()
    step = progress or (lambda _name: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    step("load")
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    m = _io.load_model(model)
    size_before = _io.approx_size(m)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    step("analyse")
    _normalize.normalize(m)
    bn_stats = _normalize.fold_batchnorm(m) if fold_bn else {}
    analysis = analyse(m, options.input_shapes)
    layers_before = layer_stats(m, analysis.shapes)
    params_before = count_params(m)
    timings["analyse"] = time.perf_counter() - t

    inversion = None
    if method_config.inverted:
        t = time.perf_counter()
        step("invert")
        inversion = _invert(analysis.channels.model, progress, seed)
        method_config.samples = inversion.feed
        timings["invert"] = time.perf_counter() - t

    t = time.perf_counter()
    step("plan")
    moments, scores = None, None
    if criterion == "recon" and (prune > 0 or budget_flops is not None):
        from onnx_udfc.channels.select import reconstruction_scores
        from onnx_udfc.methods.plus import pruning_moments, single_blas_thread
        with single_blas_thread():
            moments = pruning_moments(analysis.channels, method_config.calibration,
                                      method_config.plus)
            scores, _ = reconstruction_scores(analysis.channels, moments,
                                              analysis.channels.class_scores("l1"))
    group_ratios = {}
    if budget_flops is not None:  # per-group ratios by predicted error (onnx_udfc.channels.budget)
        from onnx_udfc.channels.budget import allocate
        group_ratios = allocate(analysis.channels, analysis.groups, budget_flops,
                                PruneConfig(prune, criterion, list(exclude), prune_coupled),
                                calibration if method == "udfc+" else None,
                                plus=method_config.plus, scores=scores, moments=moments)
    pruning = make_plan(analysis.channels, analysis.groups,
                        PruneConfig(prune, criterion, list(exclude), prune_coupled, round_to,
                                    group_ratios), scores)
    energy = removed_energy(analysis.channels, pruning.removed)
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    step("solve")
    compensation = compensate_pruning(analysis.channels, pruning.removed, method_config,
                                      bn_stats, moments if method == "udfc+" else None)
    timings["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    step("rewrite")
    apply_removal(analysis.channels, pruning.removed)
    m = _compact(m)
    analysis.channels.model, analysis.channels.graph = m, m.graph
    timings["rewrite"] = time.perf_counter() - t

    quantization: dict[str, dict] = {}
    kept: dict[str, QuantizedWeight] = {}
    if bits is not None:
        t = time.perf_counter()
        step("quantize")
        quantization = quantize_model(m, method_config, options.input_shapes, bn_stats,
                                      list(exclude) + list(quant_exclude), kept)
        m = _compact(m)
        analysis.channels.model, analysis.channels.graph = m, m.graph
        timings["quantize"] = time.perf_counter() - t

    # Counted on the float graph: integer storage changes bytes, not parameters or MACs.
    layers_after, params_after = layer_stats(m, analysis.shapes), count_params(m)
    storage = fake_summary(m, kept)
    if format == "qdq":
        t = time.perf_counter()
        step("store")
        m, storage = to_qdq(m, kept, storage_config, bits, granularity, block_size)
        if fold_bn_scales:
            folded_count, not_folded = fold_bn_into_scales(m)
            storage.update(bn_folded_into_scales=folded_count, bn_not_folded=not_folded)
        timings["store"] = time.perf_counter() - t
    for name, entry in storage.pop("layers").items():
        if name in quantization:
            quantization[name]["storage"] = entry

    if check:
        t = time.perf_counter()
        step("check")
        _io.check_model(m)
        timings["check"] = time.perf_counter() - t

    report = build_report(
        options=options, analysis=analysis, plan=pruning, layers_before=layers_before,
        layers_after=layers_after, params_before=params_before,
        params_after=params_after, size_before=size_before, size_after=_io.approx_size(m),
        predicted_error=energy, folded_bn=sorted(bn_stats), timings=timings,
        compensation=compensation, quantization=quantization)
    report.storage = storage
    report.inversion = inversion.summary() if inversion is not None else None
    return m, report


def _invert(model: onnx.ModelProto, progress: Callable[[str], None] | None, seed: int = 0):
    """The model-inversion batch of ``--moments inverted`` (:mod:`onnx_udfc.moments.inverted`)."""
    from onnx_udfc.moments.inverted import cached_inverted_inputs

    detail = getattr(progress, "detail", None)

    def tick(i: int, steps: int, loss: float) -> None:
        if detail is not None and (i % 5 == 0 or i == steps):
            detail(f"invert {i}/{steps}")
    return cached_inverted_inputs(model, seed=seed, progress=tick)


def _compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh copy of ``model``: protobuf's arena keeps every replaced weight alive until the
    message itself dies, so after a rewrite the old message holds old and new weights."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return fresh


def removed_energy(channels: ChannelAnalysis, removed: np.ndarray) -> dict[str, float]:
    """Per producer: the share of its filters' squared l2 norm that pruning removes.

    With plain pruning (no compensation) this is the predicted relative reconstruction error of
    the layer's pre-activation output for white inputs.
    """
    root = channels.roots()
    out = {}
    for p in channels.producers:
        total = float((p.l2 ** 2).sum())
        gone = removed[root[p.slots]]
        out[p.node.name or p.tensor] = float((p.l2[gone] ** 2).sum()) / total if total else 0.0
    return out


def save_compressed(model: onnx.ModelProto, path: str | os.PathLike, *,
                    source: str | os.PathLike | None = None,
                    external_data: bool | None = None, check: bool = True) -> int:
    """Save atomically (after the full checker passed on the written file when ``check``) and
    return the size on disk in bytes (model plus external data)."""
    out = _io.save_model(model, path, source=source, external_data=external_data, check=check)
    return _io.disk_size(out)
