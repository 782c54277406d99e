"""The compression methods: ``prune`` (drop channels), ``nm`` (Neuron Merging) and ``udfc``
(the paper, faithfully: Eq. 20 for pruning, Eq. 21 for quantization), with optional weight
quantization of every layer in topological order, each after its own reconstruction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnx_udfc.channels.absorbers import absorbers, weight_uses
from onnx_udfc.channels.analysis import ChannelAnalysis, analyse
from onnx_udfc.channels.stats import layer_stats, weight_layer
from onnx_udfc.config import MethodOptions, QuantOptions
from onnx_udfc.core.io import (
    graph_inputs,
    infer_shapes,
    set_tensor_array,
    tensor_dtype,
)
from onnx_udfc.core.normalize import BatchNormStats
from onnx_udfc.methods import get_method
from onnx_udfc.methods import plus as udfc_plus
from onnx_udfc.methods.base import PruneJob, QuantJob, RunContext
from onnx_udfc.methods.coverage import (
    quantizable,
    recurrent_weights,
    subgraph_weight_layers,
)
from onnx_udfc.moments.input_range import InputRange
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.quant.grids import QuantizedWeight, quantize_blocks_params, quantize_params


@dataclass
class MethodRun:
    """What a method reads: the user's method and quantization options (written once, in
    :mod:`onnx_udfc.config`) plus what the run adds (the model-inversion batch)."""

    options: MethodOptions = field(default_factory=MethodOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    samples: Any = None  # udfc+ --moments inverted: the fitted input batch
    input_range: InputRange | None = None  # of the image input, for the data-free samples

    @property
    def method(self) -> str:
        return self.options.name

    @property
    def calibration(self) -> Any:
        return self.options.calibration

    @property
    def plus(self) -> udfc_plus.PlusConfig:
        """The udfc+ hyperparameters with this run's choices."""
        m = self.options
        return dataclasses.replace(udfc_plus.DEFAULT, moments=m.moments,
                                   sequential=m.sequential, samples=self.samples, seed=m.seed,
                                   input_range=self.input_range)


@udfc_plus.plus_threads("cfg")
def compensate_pruning(ctx: ChannelAnalysis, removed: np.ndarray, cfg: MethodRun,
                       folded: dict[str, BatchNormStats] | None = None,
                       moments: dict | None = None,
                       source: MomentSource | None = None,
                       detail: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Fold each pruned channel's reconstruction into the next layers (before the rewrite).

    udfc+ reads ``moments`` (of the producers' activations, see
    :func:`~onnx_udfc.channels.activations.pruning_moments`) when given, else asks ``source``
    (the run's :class:`MomentSource`; one from ``cfg`` when None).

    ``detail`` receives a per-layer counter (the progress bar's label).

    Returns per producer: ``compensated`` (bool), ``reason`` when not, the statistics source,
    the mean Eq. 12 residual (``predicted_error``, relative: 0 exact, 1 nothing recovered) and
    degenerate channels.
    """
    if not removed.any():  # nothing to rebuild: no moments to read either
        return {}
    method = get_method(cfg.method)
    run = RunContext(ctx, cfg, folded or {}, {o.name for o in ctx.graph.output}, moments,
                     source, detail, removed)
    method.prepare_pruning(run)
    root = ctx.roots()
    sources = np.bincount(root[np.asarray(ctx._source) > 0], minlength=len(root))
    uses = weight_uses(ctx.graph)
    out: dict[str, dict] = {}
    deferred: list[PruneJob] = []
    for p in ctx.producers:
        cls = root[p.slots]
        gone = removed[cls]
        if not gone.any():
            continue
        name = p.node.name or p.tensor
        entry: dict[str, Any] = {"method": cfg.method, "compensated": False}
        out[name] = entry
        job, reason = _prune_job(run, p, cls, gone, sources, uses,
                                 method.through_channel_separate) \
            if method.name != "prune" else (None, None)
        if job is None:
            entry["reason"] = reason or f"method {method.name}: no compensation"
            continue
        if via := {id(n): n for a in job.absorbers for n in a.crossed}:
            entry["through"] = [n.name or n.output[0] for n in via.values()]
        if not method.reconstruct(run, job, entry):
            deferred.append(job)
    if deferred:
        for name, e in method.finish_pruning(run, removed, deferred).items():
            out[name].update(e)
    return out


def _prune_job(run: RunContext, p: Any, cls: np.ndarray, gone: np.ndarray,
               sources: np.ndarray, uses: dict[str, int], through_channel_separate: bool
               ) -> tuple[PruneJob | None, str | None]:
    """The checks every method shares: a weight layout the solver knows, channels that are
    the layer's own, and next layers that can take the correction alone (past depthwise Convs
    with ``through_channel_separate``)."""
    ctx = run.ctx
    layer = weight_layer(p.node, ctx.inits)
    if layer is None:
        return None, f"{p.node.op_type} layout not supported by the solver"
    if (sources[cls] > 1).any():
        return None, "channels tied to other layers (coupled group)"
    found, reason = absorbers(p.node, ctx, cross_channel=True,
                              through_channel_separate=through_channel_separate)
    if reason is None and any(uses.get(a.layer.weight, 0) > 1 for a in found):
        reason = "the next layer's weight is shared with another node"
    if reason is not None:
        return None, reason
    stats, stats_kind = layer_stats(layer, ctx.inits, ctx.consumers, run.outputs, run.folded)
    return PruneJob(p, layer, found, cls, np.flatnonzero(~gone), np.flatnonzero(gone), stats,
                    stats_kind), None


@udfc_plus.plus_threads("cfg")
def quantize_model(model: onnx.ModelProto, cfg: MethodRun,
                   input_shapes: dict[str, list[int]] | None = None,
                   folded: dict[str, BatchNormStats] | None = None,
                   exclude: list[str] | None = None,
                   results: dict[str, QuantizedWeight] | None = None,
                   source: MomentSource | None = None,
                   float_layers: list[dict[str, str]] | None = None,
                   bits_for: dict[str, int | None] | None = None,
                   detail: Callable[[str], None] | None = None,
                   float_reason: str = "kept in float by the mixed-precision plan",
                   analysis: ChannelAnalysis | None = None,
                   ) -> dict[str, dict]:
    """Fake-quantize every weight layer in graph order; with ``udfc`` each layer's Eq. 21
    scales go into the layers that read it before those are quantized in turn. Recurrent
    weights (LSTM/GRU/RNN ``W`` and ``R``) are rounded to nearest afterwards.

    ``results``, when given, receives each layer's :class:`QuantizedWeight` (integer codes,
    scales, zero points) so integer storage can write exactly what the fake model holds;
    ``float_layers`` every weight layer kept in float as ``{node, reason}`` (see
    :mod:`onnx_udfc.methods.coverage`). udfc+ reads its moments from ``source`` (the run's; one
    from ``cfg`` when None). ``bits_for`` (a mixed-precision plan, :mod:`onnx_udfc.methods.mixed`)
    overrides the bits per layer name; None there keeps the layer in float, listed with
    ``float_reason`` (the plan's own, ``MixedPlan.float_reason``). ``detail`` receives a
    per-layer counter. ``analysis``: a channel analysis of ``model`` as it is (its own
    initializer and node objects, e.g. the pipeline's when nothing was pruned), used instead
    of analysing the model again."""
    if analysis is not None and analysis.model is not model:
        raise ValueError("the analysis given to quantize_model is of another model")
    ctx = analysis if analysis is not None else \
        analyse(model, infer_shapes(model, input_shapes), norms=False)
    method, grid = get_method(cfg.method), cfg.quant
    run = RunContext(ctx, cfg, folded or {}, {o.name for o in model.graph.output}, None,
                     source)
    method.prepare_quantization(run)
    patterns = [re.compile(p) for p in exclude or []]
    inputs = {i.name for i in graph_inputs(model)}
    plan = bits_for or {}
    kept_float: list[dict[str, str]] = []
    out: dict[str, dict] = {}
    checked = [(node, *quantizable(node, ctx.inits, inputs, patterns))
               for node in list(model.graph.node)]
    recurrent = [r for node in model.graph.node
                 for r in recurrent_weights(node, ctx.inits, inputs, patterns)]
    total = sum(layer is not None and plan.get(node.name or node.output[0], grid.bits)
                is not None for node, layer, _ in checked)
    for node, layer, reason in checked:
        name = node.name or node.output[0]
        if layer is not None and plan.get(name, grid.bits) is None:
            layer, reason = None, float_reason
        if reason is not None:
            kept_float.append({"node": name, "reason": reason})
        if layer is None:
            continue
        if detail is not None:
            detail(f"quantize {len(out) + 1}/{total}")
        job = QuantJob(node, layer, layer.filters(ctx.inits))
        q = _grid_values(ctx, layer, job.filters, grid, plan.get(name, grid.bits))
        q = method.round(run, job, q)
        _keep(ctx, name, layer, job, q, grid, results, out)
        method.after_rounding(run, job)
    for key, layer, reason in recurrent:
        if layer is not None and plan.get(key, grid.bits) is None:
            layer, reason = None, float_reason
        if layer is None:
            kept_float.append({"node": key, "reason": str(reason)})
            continue
        job = QuantJob(layer.node, layer, layer.filters(ctx.inits))
        # Block-wise scales follow a weight layer's input channels; a recurrent weight keeps
        # per-row scales.
        q = _grid_values(ctx, layer, job.filters, dataclasses.replace(grid, block_size=None),
                         plan.get(key, grid.bits))
        _keep(ctx, key, layer, job, q, grid, results, out)
        out[key]["rounding"] = "nearest (recurrent weight)"
    if float_layers is not None:
        float_layers.extend(kept_float + subgraph_weight_layers(model))
    return out


def _grid_values(ctx: ChannelAnalysis, layer: Any, filters: np.ndarray, grid: QuantOptions,
                 bits: int) -> Any:
    """The layer's round-to-nearest grid values. Scales in the weight's own dtype: what
    integer storage writes, so the fake model and its integer (qdq) twin hold bit-identical
    weights."""
    init = ctx.inits[layer.weight]
    dtype = tensor_dtype(init)
    if grid.block_size:
        return quantize_blocks_params(filters.reshape(_filters_shape(init, layer)), bits,
                                      grid.quantizer, grid.block_size, dtype)
    return quantize_params(filters, bits, grid.quantizer, grid.granularity, dtype)


def _keep(ctx: ChannelAnalysis, name: str, layer: Any, job: QuantJob, q: Any,
          grid: QuantOptions, results: dict[str, QuantizedWeight] | None,
          out: dict[str, dict]) -> None:
    """Write the rounded weights back and record the layer's report entry."""
    if results is not None:
        results[name] = QuantizedWeight(layer.weight, layer.out_axis, q)
    f = job.filters
    job.rounded = np.asarray(q.dequantized, dtype=np.float64).reshape(f.shape)
    norm = float(np.linalg.norm(f))
    gptq = job.entry.pop("gptq", None)
    job.entry.update({"bits": q.bits, "quantizer": grid.quantizer,
                      "granularity": "block" if q.block_size else grid.granularity,
                      "block_size": q.block_size,
                      "quant_error": float(np.linalg.norm(job.rounded - f) / norm)
                      if norm else 0.0, "scale_compensated": False})
    if gptq is not None:
        job.entry["gptq"] = gptq
    out[name] = job.entry
    _write_filters(ctx, layer, job.rounded)


def _filters_shape(init: onnx.TensorProto, layer: Any) -> tuple[int, ...]:
    """The weight's shape with the output axis first (the layout of the filters)."""
    dims = list(init.dims)
    return (dims.pop(layer.out_axis), *dims)


def _write_filters(ctx: ChannelAnalysis, layer, filters: np.ndarray) -> None:
    init = ctx.inits[layer.weight]
    new = np.moveaxis(filters.reshape(_filters_shape(init, layer)), 0, layer.out_axis)
    set_tensor_array(init, new.astype(tensor_dtype(init)))
