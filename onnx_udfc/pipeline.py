"""The compression pipeline: one list of named stages over one run state.

``STAGES`` is the single source of the stage list: the progress bar counts it, the report's
``timings`` are keyed by it, and ``docs/pipeline.md`` is generated from it. Each stage says
whether it applies to a configuration and works on the :class:`RunState`; nothing is written
to disk here (the command line writes every output together, see :mod:`onnx_udfc.cli`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnx_udfc.channels.activations import pruning_moments
from onnx_udfc.channels.analysis import ChannelAnalysis, ChannelGroup
from onnx_udfc.channels.analysis import analyse as analyse_channels
from onnx_udfc.channels.plan import PrunePlan, make_plan
from onnx_udfc.channels.rewrite import apply_removal
from onnx_udfc.channels.select import reconstruction_scores, resolve_criterion
from onnx_udfc.config import CompressConfig
from onnx_udfc.core import io, normalize
from onnx_udfc.core.blas import single_blas_thread
from onnx_udfc.core.input_shapes import WorkingShape, shape_lists, working_input_shapes
from onnx_udfc.methods import select
from onnx_udfc.methods.compensate import MethodRun, compensate_pruning, quantize_model
from onnx_udfc.methods.mixed import Sensitivities, allocate_bits, allocate_float_share
from onnx_udfc.methods.plus import moment_source
from onnx_udfc.moments.input_range import InputRange, resolve_input_range
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.ops.checks import check_weight_layers, refuse_quantized
from onnx_udfc.ops.cost import LayerStats, count_params, layer_stats
from onnx_udfc.quant.bn_scales import fold_bn_into_scales
from onnx_udfc.quant.grids import QuantizedWeight
from onnx_udfc.quant.qdq import fake_summary, to_qdq
from onnx_udfc.report.report import Report, build_report

Progress = Callable[[str], None]


@dataclass
class Analysis:
    """The channel analysis of a model with its groups and inferred shapes."""

    channels: ChannelAnalysis
    groups: list[ChannelGroup]
    shapes: dict

    @property
    def model(self) -> onnx.ModelProto:
        return self.channels.model


def analyse(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
            ) -> Analysis:
    """Shapes, then the channel analysis; a weight layer contradicting its op is refused
    first (one line naming the node)."""
    shapes = io.infer_shapes(model, input_shapes or None)
    check_weight_layers(model, shapes)
    channels = analyse_channels(model, shapes)
    return Analysis(channels, channels.groups(), shapes)


@dataclass
class RunState:
    """What the stages hand each other."""

    config: CompressConfig
    model: onnx.ModelProto
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)
    size_before: int = 0
    bn_stats: dict = field(default_factory=dict)
    analysis: Analysis | None = None
    layers_before: list[LayerStats] = field(default_factory=list)
    params_before: int = 0
    inversion: Any = None
    method_config: MethodRun | None = None
    source: MomentSource | None = None
    moments: dict | None = None
    scores: np.ndarray | None = None
    plan: PrunePlan | None = None
    energy: dict[str, float] = field(default_factory=dict)
    compensation: dict[str, dict] = field(default_factory=dict)
    quantization: dict[str, dict] = field(default_factory=dict)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    duplicated: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, QuantizedWeight] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    layers_after: list[LayerStats] | None = None
    params_after: int = 0
    input_shapes: dict[str, WorkingShape] = field(default_factory=dict)
    input_range: InputRange | None = None
    mixed: Any = None  # methods.mixed.MixedPlan under --budget-size or --float-share
    sensitivities: Sensitivities | None = None  # shared by --select-method's candidate runs
    flops_budget: dict[str, Any] | None = None  # --budget-flops: how groups were weighted
    # normalise replaced weights (folded a BN or a Mul/Add): the old ones stay in the message's
    # arena until a compact() copy
    weights_replaced: bool = False
    # the channel analysis reads ``model`` itself (its initializers and nodes are the model's
    # own objects): quantize may reuse it (see _quantize)
    analysis_current: bool = False

    @property
    def working_shapes(self) -> dict[str, list[int]]:
        """Concrete shapes of the inputs with dynamic sizes (``--input-shape`` or chosen)."""
        return shape_lists(self.input_shapes)

    @property
    def channels(self) -> ChannelAnalysis:
        assert self.analysis is not None
        return self.analysis.channels

    def replace_model(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.analysis_current = False  # its initializers and nodes are the old model's
        self.channels.model, self.channels.graph = model, model.graph


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    run: Callable[[RunState], None]
    applies: Callable[[CompressConfig], bool] = lambda _config: True


def _load(state: RunState) -> None:
    state.model = io.load_model(state.model)
    refuse_quantized(state.model)
    state.size_before = io.approx_size(state.model)
    state.input_shapes = working_input_shapes(state.model, state.config.graph.input_shapes)
    if state.input_range is None:
        state.input_range = resolve_input_range(state.model, state.config.graph.input_range,
                                                state.working_shapes)


def _normalise(state: RunState) -> None:
    counts = normalize.normalize(state.model)
    if state.config.graph.fold_bn:
        state.bn_stats = normalize.fold_batchnorm(state.model)
    state.weights_replaced = bool(counts["affine"] or state.bn_stats)


def _analyse(state: RunState) -> None:
    state.analysis = analyse(state.model, state.working_shapes)
    state.analysis_current = True
    state.layers_before = layer_stats(state.model, state.analysis.shapes)
    state.params_before = count_params(state.model)
    state.method_config = method_config(state.config)
    state.method_config.input_range = state.input_range


def _detail(state: RunState) -> Callable[[str], None] | None:
    """The progress bar's label for a counter inside a long stage (None without a bar)."""
    return getattr(state.progress, "detail", None)


def _moments(state: RunState) -> None:
    """Model inversion (``--moments inverted``): the fitted batch stands in for the data."""
    from onnx_udfc.moments.inverted import cached_inverted_inputs

    detail = _detail(state)

    def tick(i: int, steps: int, loss: float) -> None:
        if detail is not None and (i % 5 == 0 or i == steps):
            detail(f"invert {i}/{steps}")
    state.inversion = cached_inverted_inputs(state.channels.model, seed=state.config.method.seed,
                                             progress=tick, input_shapes=state.working_shapes)
    assert state.method_config is not None
    state.method_config.samples = state.inversion.feed


def _plan(state: RunState) -> None:
    p, cfg = state.config.prune, state.method_config
    assert cfg is not None and state.analysis is not None
    channels = state.channels
    # One moment source for the run: every stage reads the same kind, a fallback is final.
    # The calibration set feeds udfc+ and --criterion recon; a budget alone ranks the other
    # methods' groups on data-free moments.
    pruning = p.ratio > 0 or p.budget_flops is not None
    state.source = moment_source(
        channels.model, cfg.plus,
        cfg.calibration if cfg.method == "udfc+" or p.criterion == "recon" and pruning else None,
        state.working_shapes, pruning and cfg.method == "udfc+" and cfg.plus.sequential,
        pruning)
    state.source.progress = _detail(state)
    p = replace(p, criterion=resolve_criterion(p.criterion, cfg.method, state.source.kind,
                                               channels.model, state.working_shapes))
    recon = p.criterion == "recon" and pruning
    if recon or p.budget_flops is not None:
        state.moments = pruning_moments(channels, state.source, "plan")
    if recon:
        assert state.moments is not None
        state.scores, _ = reconstruction_scores(channels, state.moments,
                                                channels.class_scores("l1"))
    group_ratios = {}
    if p.budget_flops is not None:
        from onnx_udfc.channels.budget import allocate
        state.flops_budget = {}
        group_ratios = allocate(channels, state.analysis.groups, p.budget_flops,
                                p, state.source, scores=state.scores,
                                moments=state.moments, measured=state.flops_budget)
    state.plan = make_plan(channels, state.analysis.groups, p, state.scores, group_ratios)
    state.energy = removed_energy(channels, state.plan.removed)


def _compensate(state: RunState) -> None:
    cfg = state.method_config
    assert cfg is not None and state.plan is not None
    state.compensation = compensate_pruning(state.channels, state.plan.removed, cfg,
                                            state.bn_stats,
                                            state.moments if cfg.method == "udfc+" else None,
                                            state.source, _detail(state))


def _rewrite(state: RunState) -> None:
    assert state.plan is not None
    state.duplicated = apply_removal(state.channels, state.plan.removed).duplicated()
    # Nothing removed: no rule rewrote a node or a weight, so the copy would free nothing
    # (unless normalise replaced weights) and the analysis still describes the model, which
    # spares quantize a second one.
    if state.plan.removed.any() or state.weights_replaced:
        state.replace_model(compact(state.model))


def _quantize(state: RunState) -> None:
    cfg, q = state.method_config, state.config.quant
    assert cfg is not None and state.source is not None
    exclude = list(state.config.prune.exclude) + list(q.exclude)
    bits_for = None
    if q.budget_size is not None or q.float_share > 0:
        detail = getattr(state.progress, "detail", None)
        tick = None if detail is None else lambda i, n: detail(f"sensitivity {i}/{n}")
        if q.budget_size is not None:
            state.mixed = allocate_bits(state.model, q, q.budget_size, state.size_before,
                                        state.source, exclude, tick, state.sensitivities)
        else:
            state.mixed = allocate_float_share(state.model, q, q.float_share,
                                               state.size_before, state.source, exclude,
                                               tick, state.sensitivities)
        bits_for = state.mixed.bits
    reason = {"float_reason": state.mixed.float_reason} if state.mixed else {}
    # The stages' analysis when it still describes the model (nothing was pruned): the same
    # rules on the same graph, and nothing after the analyse stage edits its slots.
    analysis = state.channels if state.analysis_current else None
    state.quantization = quantize_model(state.model, cfg, state.working_shapes or None,
                                        state.bn_stats, exclude, state.kept, state.source,
                                        state.float_layers, bits_for, _detail(state),
                                        analysis=analysis, **reason)
    io.sync_initializer_inputs(state.model)  # a bias correction may add a bias (IR < 4)
    state.replace_model(compact(state.model))


def _count_after(state: RunState) -> None:
    """Parameters and MACs of the compressed float graph: integer storage changes bytes, not
    parameters or MACs, and the counters read float weight layers."""
    assert state.analysis is not None
    state.layers_after = layer_stats(state.model, state.analysis.shapes)
    state.params_after = count_params(state.model)


def _store(state: RunState) -> None:
    s, q = state.config.storage, state.config.quant
    _count_after(state)
    state.model, state.storage = to_qdq(state.model, state.kept,
                                        s, q)
    if s.fold_bn_scales:
        folded, not_folded = fold_bn_into_scales(state.model)
        state.storage.update(bn_folded_into_scales=folded, bn_not_folded=not_folded)


def _check(state: RunState) -> None:
    io.check_model(state.model)


STAGES: list[Stage] = [
    Stage("load", "read the model (external data too), check it is a valid ONNX graph and "
          "refuse one that is already quantized", _load),
    Stage("normalise", "constants to initializers, Identity aliases bypassed, shape arithmetic "
          "folded; BatchNorm folded with --fold-bn", _normalise),
    Stage("analyse", "channel slots and groups: which channels must go together, and why the "
          "others cannot", _analyse),
    Stage("moments", "udfc+ --moments inverted: fit synthetic images to the BatchNorm "
          "statistics (model inversion)", _moments, lambda c: c.inverted),
    Stage("plan", "choose the channels to remove (ratio or FLOPs budget, criterion)", _plan),
    Stage("compensate", "fold each pruned channel's reconstruction into the layers that read "
          "it (the method's maths)", _compensate),
    Stage("rewrite", "remove the planned channels physically from every node that holds them",
          _rewrite),
    Stage("quantize", "round every weight layer to --bits (or to the bits --budget-size "
          "allocates by measured sensitivity; --float-share keeps the most sensitive layers "
          "in float), with the method's compensation",
          _quantize, lambda c: c.quant.bits is not None),
    Stage("store", "write quantized weights as integers read by DequantizeLinear",
          _store, lambda c: c.storage.format == "qdq"),
    Stage("check", "the full onnx.checker on the result", _check),
]
# Stages run by the command line after the in-memory pipeline (onnx_udfc.cli).
OUTPUT_STAGES: list[Stage] = [
    Stage("save", "write the model to a temporary file beside the output, checked on disk",
          lambda _s: None),
    Stage("verify", "compare outputs with the original in ONNX Runtime", lambda _s: None,
          lambda c: c.check.verify),
    Stage("latency", "time both models in ONNX Runtime, interleaved", lambda _s: None,
          lambda c: c.check.latency),
    Stage("write", "move every output (model, report, plot) into place together",
          lambda _s: None),
]


def stage_names(config: CompressConfig, with_outputs: bool = False) -> list[str]:
    """The stages a run of ``config`` goes through, in order (for the progress bar)."""
    if with_outputs:  # the saved file is checked instead of the in-memory model
        stages = [s for s in STAGES if s.name != "check"] + OUTPUT_STAGES
    else:
        stages = STAGES
    names = [s.name for s in stages if s.applies(config)]
    if select.applies(config):
        names.insert(names.index("save") if "save" in names else len(names), "select")
    return names


def run(config: CompressConfig, model: io.ModelSource, progress: Progress | None = None,
        check: bool = True, copy: bool = True, input_range: InputRange | None = None
        ) -> tuple[onnx.ModelProto, Report]:
    """Run every stage that applies; returns the compressed model and its report.

    ``config`` must be validated. A ``ModelProto`` argument is copied, never modified.
    ``check=False`` skips the in-memory checker (the command line checks the written file);
    ``copy=False`` works on a given ``ModelProto`` in place (a model loaded for this run).
    ``input_range``: the model's, when the caller has resolved it already (the guard's).
    Under ``--select-method`` the stages run once per candidate method
    (:mod:`onnx_udfc.methods.select`)."""
    if isinstance(model, onnx.ModelProto) and copy:
        model = compact(model)
    shown = progress or (lambda _name: None)
    if select.applies(config):
        return _run_selected(config, model, shown, check, input_range)  # type: ignore[arg-type]
    state = _run_stages(config, model, shown, check, input_range)  # type: ignore[arg-type]
    return state.model, _report(state)


def _run_stages(config: CompressConfig, model: io.ModelSource, progress: Progress,
                check: bool, input_range: InputRange | None,
                sensitivities: Sensitivities | None = None) -> RunState:
    state = RunState(config, model, progress, input_range=input_range,  # type: ignore[arg-type]
                     sensitivities=sensitivities)
    with single_blas_thread():  # every method's many mid-sized products (see core.blas)
        for stage in STAGES:
            if not stage.applies(config) or (stage.name == "check" and not check):
                continue
            state.progress(stage.name)
            start = time.perf_counter()
            stage.run(state)
            state.timings[stage.name] = time.perf_counter() - start
    return state


def _run_selected(config: CompressConfig, model: io.ModelSource, progress: Progress,
                  check: bool, input_range: InputRange | None
                  ) -> tuple[onnx.ModelProto, Report]:
    """Each candidate method on its own copy of the model; the one whose outputs drift least
    is kept (the configured one when none can be compared). Only the best so far is held."""
    began = time.perf_counter()
    original = io.load_model(model)
    judge: select.Judge | None = None
    best: tuple[float | None, int, RunState] | None = None
    shared = Sensitivities()  # both fits prune the same channels: one drift measurement
    for i, candidate in enumerate(select.candidates(config)):
        start = time.perf_counter()
        shown = progress if i == 0 else _CandidateProgress(progress,
                                                           select.method_label(candidate))
        state = _run_stages(candidate, compact(original), shown, check, input_range, shared)
        input_range = state.input_range
        if judge is None:
            judge = select.Judge(original, state.working_shapes, input_range,
                                 config.method.seed, config.method.calibration)
        error = judge.error(state.model)
        judge.record(candidate, error, time.perf_counter() - start)
        if best is None or (error is not None and best[0] is not None and error < best[0]):
            best = (error, i, state)
        if judge.cause is not None:
            break
        del state
    assert best is not None and judge is not None
    progress("select")
    _, chosen, state = best
    report = _report(state)
    report.selection = judge.summary(chosen)
    report.timings["select"] = time.perf_counter() - began - sum(state.timings.values())
    return state.model, report


class _CandidateProgress:
    """The progress bar's label for a candidate after the first: its stages do not advance
    the bar (the command counts one run of the stages)."""

    def __init__(self, parent: Progress, label: str) -> None:
        self.parent, self.label = parent, label

    def __call__(self, name: str) -> None:
        self.detail(name)

    def detail(self, text: str) -> None:
        shown = getattr(self.parent, "detail", None)
        if shown is not None:
            shown(f"{self.label}: {text}")


def _report(state: RunState) -> Report:
    assert state.analysis is not None and state.plan is not None
    if state.layers_after is None:
        _count_after(state)
    storage = state.storage or fake_summary(state.model, state.kept)
    for name, entry in storage.pop("layers").items():
        if name in state.quantization:
            state.quantization[name]["storage"] = entry
    report = build_report(
        config=state.config.to_dict(), analysis=state.analysis, plan=state.plan,
        layers_before=state.layers_before, layers_after=state.layers_after,
        params_before=state.params_before, params_after=state.params_after,
        size_before=state.size_before, size_after=io.approx_size(state.model),
        predicted_error=state.energy, folded_bn=sorted(state.bn_stats),
        timings=state.timings, compensation=state.compensation,
        quantization=state.quantization)
    report.storage = storage
    report.float_layers = state.float_layers
    report.duplicated_initializers = state.duplicated
    report.input_shapes = {name: s.to_dict() for name, s in state.input_shapes.items()}
    report.input_range = state.input_range.to_dict() if state.input_range else None
    report.mixed_precision = state.mixed.to_dict() if state.mixed is not None else None
    report.flops_budget = state.flops_budget
    report.inversion = state.inversion.summary() if state.inversion is not None else None
    used = state.method_config is not None and state.method_config.method == "udfc+"
    report.moments = state.source.to_dict() if state.source is not None and (
        used or state.moments is not None) else None
    report.criterion = state.plan.criterion
    return report


def method_config(config: CompressConfig) -> MethodRun:
    return MethodRun(config.method, config.quant)


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
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
