"""The compression methods: ``prune`` (drop channels), ``nm`` (Neuron Merging) and ``udfc``
(the paper, faithfully: Eq. 20 for pruning, Eq. 21 for quantization), with optional weight
quantization of every layer in topological order, each after its own reconstruction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnx_udfc.channels.absorbers import absorbers, apply_reconstruction, apply_scales, weight_uses
from onnx_udfc.channels.activations import pruning_moments
from onnx_udfc.channels.analysis import ChannelAnalysis, analyse
from onnx_udfc.channels.stats import layer_stats, weight_layer
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import infer_shapes, set_tensor_array, tensor_array
from onnx_udfc.core.normalize import BatchNormStats
from onnx_udfc.methods import plus as udfc_plus
from onnx_udfc.methods.equations import (
    eq14_21_quantization_scale,
    eq20_pruning_coefficients,
    neuron_merging_pairs,
)
from onnx_udfc.moments.source import MomentSource, check_request
from onnx_udfc.quant.gptq_layer import gptq_layer
from onnx_udfc.quant.grids import QuantizedWeight, quantize_blocks_params, quantize_params

METHODS = ("prune", "nm", "udfc", "udfc+")
QUANTIZERS = ("paper", "symmetric", "asymmetric")
GRANULARITIES = ("tensor", "channel")


@dataclass
class MethodConfig:
    method: str = "prune"
    bits: int | None = None
    quantizer: str = "paper"
    granularity: str = "tensor"
    alpha1: float = 0.01
    alpha2: float = 0.008
    calibration: Any = None  # udfc+: inputs to measure moments on (array, dict, .npz)
    block_size: int | None = None  # block-wise scales along the input channels (overrides
    # granularity), the layout of ONNX's blocked DequantizeLinear
    moments: str = "auto"  # udfc+: what to read the moments from (moments.source.MOMENTS)
    sequential: bool = False  # udfc+: fit each layer on the compressed-so-far network
    samples: Any = None  # udfc+ --moments inverted: the fitted input batch
    seed: int = 0  # udfc+: of the synthetic samples / the inversion's start

    @property
    def inverted(self) -> bool:
        """True when this run needs the model-inversion batch (udfc+ without calibration)."""
        return self.method == "udfc+" and self.moments == "inverted" and self.calibration is None

    @property
    def plus(self) -> udfc_plus.PlusConfig:
        """The udfc+ hyperparameters with this run's choices."""
        return dataclasses.replace(udfc_plus.DEFAULT, moments=self.moments,
                                   sequential=self.sequential, samples=self.samples,
                                   seed=self.seed)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UdfcError(f"unknown method '{self.method}' (choose {', '.join(METHODS)})")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(
                self.bits, int) or not 2 <= self.bits <= 8):
            raise UdfcError(f"bits must be an integer in 2..8, got {self.bits!r}")
        check_request(self.moments)
        if self.sequential and self.method != "udfc+":
            raise UdfcError("--sequential applies to --method udfc+ only")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) \
                or self.seed < 0:
            raise UdfcError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.quantizer not in QUANTIZERS:
            raise UdfcError(f"unknown quantizer '{self.quantizer}' "
                            f"(choose {', '.join(QUANTIZERS)})")
        if self.granularity not in GRANULARITIES:
            raise UdfcError(f"unknown granularity '{self.granularity}' (choose tensor, channel)")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(
                self.block_size, int) or self.block_size < 2):
            raise UdfcError(f"block size must be an integer >= 2, got {self.block_size!r}")
        if self.block_size is not None and self.bits is None:
            raise UdfcError("--block-size sets the quantization blocks: give --bits too")
        for name in ("alpha1", "alpha2"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise UdfcError(f"{name} must be a finite number >= 0, got {value!r}")


@udfc_plus.plus_threads("cfg")
def compensate_pruning(ctx: ChannelAnalysis, removed: np.ndarray, cfg: MethodConfig,
                       folded: dict[str, BatchNormStats] | None = None,
                       moments: dict | None = None,
                       source: MomentSource | None = None) -> dict[str, dict]:
    """Fold each pruned channel's reconstruction into the next layers (before the rewrite).

    udfc+ reads ``moments`` (of the producers' activations, see
    :func:`~onnx_udfc.channels.activations.pruning_moments`) when given, else asks ``source``
    (the run's :class:`MomentSource`; one from ``cfg`` when None).

    Returns per producer: ``compensated`` (bool), ``reason`` when not, the statistics source,
    the mean Eq. 12 residual (``predicted_error``, relative: 0 exact, 1 nothing recovered) and
    degenerate channels.
    """
    root = ctx.roots()
    sources = np.bincount(root[np.asarray(ctx._source) > 0], minlength=len(root))
    outputs = {o.name for o in ctx.graph.output}
    uses = weight_uses(ctx.graph)
    out: dict[str, dict] = {}
    todo: list = []
    plus = cfg.plus
    if cfg.method == "udfc+" and source is None:
        source = udfc_plus.moment_source(ctx.model, plus, cfg.calibration)
    if cfg.method != "udfc+" or plus.sequential:
        moments = {}
    elif moments is None:
        moments = pruning_moments(ctx, source, "compensate")
    for p in ctx.producers:
        cls = root[p.slots]
        gone = removed[cls]
        if not gone.any():
            continue
        name = p.node.name or p.tensor
        entry: dict[str, Any] = {"method": cfg.method, "compensated": False}
        out[name] = entry
        layer = weight_layer(p.node, ctx.inits)
        if cfg.method == "prune":
            entry["reason"] = "method prune: no compensation"
            continue
        if layer is None:
            entry["reason"] = f"{p.node.op_type} layout not supported by the solver"
            continue
        if (sources[cls] > 1).any():
            entry["reason"] = "channels tied to other layers (coupled group)"
            continue
        found, reason = absorbers(p.node, ctx, cross_channel=True)
        if reason is None and any(uses.get(a.layer.weight, 0) > 1 for a in found):
            reason = "the next layer's weight is shared with another node"
        if reason is not None:
            entry["reason"] = reason
            continue
        stats, stats_kind = layer_stats(layer, ctx.inits, ctx.consumers, outputs, folded)
        f = layer.filters(ctx.inits)
        kept, pruned = np.flatnonzero(~gone), np.flatnonzero(gone)
        if cfg.method == "udfc+" and plus.sequential:
            todo.append((p, found, cls, kept, pruned))
            continue
        if cfg.method == "udfc+":
            entry.update(udfc_plus.plus_pruning(ctx, p, found, cls, kept, pruned, moments,
                                                plus))
            continue
        if cfg.method == "udfc":
            sol = eq20_pruning_coefficients(f, stats, kept, pruned, cfg.alpha1)
            coefficients, degenerate = sol.coefficients, sol.degenerate
            entry["predicted_error"] = float(np.mean(sol.residual))
        else:
            pairs = neuron_merging_pairs(f, stats, kept, pruned)
            coefficients, degenerate = pairs.coefficients(kept), pairs.degenerate
            entry["merged"] = int((pairs.targets >= 0).sum())
        skipped = apply_reconstruction(ctx, found, cls[kept], cls[pruned], coefficients)
        entry.update(compensated=not skipped, stats=stats_kind,
                     absorbers=[a.layer.node.name for a in found],
                     degenerate=[{"channel": int(j), "reason": r} for j, r in degenerate])
        if skipped:
            entry["reason"] = f"channels missing from the input of {', '.join(skipped)}"
        curved = sorted({op for a in found for op in a.nonlinear})
        if curved:  # not positively homogeneous: the reconstruction is an approximation
            entry["activations"] = curved
    if todo:
        from onnx_udfc.methods.sequential import sequential_pruning
        feed = source.sample_feed(ctx.model, plus.seq_limit)
        measured = source.kind == "measured"
        # with real inputs every channel is refitted; on synthetic ones only the pruned
        # (refitting the kept ones to synthetic data lost 9 points at 50 % on ResNet-56)
        for name, e in sequential_pruning(ctx, removed, todo, feed, not measured,
                                          plus.seq_lam, plus.seq_const_scale,
                                          full=measured, output_fit=plus.seq_output).items():
            out[name].update(e)
    return out


@udfc_plus.plus_threads("cfg")
def quantize_model(model: onnx.ModelProto, cfg: MethodConfig,
                   input_shapes: dict[str, list[int]] | None = None,
                   folded: dict[str, BatchNormStats] | None = None,
                   exclude: list[str] | None = None,
                   results: dict[str, QuantizedWeight] | None = None,
                   source: MomentSource | None = None) -> dict[str, dict]:
    """Fake-quantize every weight layer in graph order; with ``udfc`` each layer's Eq. 21
    scales go into the layers that read it before those are quantized in turn.

    ``results``, when given, receives each layer's :class:`QuantizedWeight` (integer codes,
    scales, zero points) so integer storage can write exactly what the fake model holds.
    udfc+ reads its moments from ``source`` (the run's; one from ``cfg`` when None)."""
    ctx = analyse(model, infer_shapes(model, input_shapes))
    root = ctx.roots()
    outputs = {o.name for o in model.graph.output}
    patterns = [re.compile(p) for p in exclude or []]
    out: dict[str, dict] = {}
    moments = {}
    if cfg.method == "udfc+":
        source = source or udfc_plus.moment_source(model, cfg.plus, cfg.calibration)
        moments = udfc_plus.quant_moments(model, ctx, source, cfg.plus)
    for node in list(model.graph.node):
        layer = weight_layer(node, ctx.inits)
        if layer is None or any(p.search(node.name or "") for p in patterns):
            continue
        name = node.name or node.output[0]
        f = layer.filters(ctx.inits)
        w = tensor_array(ctx.inits[layer.weight])
        # Scales in the weight's own dtype: what integer storage writes, so the fake model
        # and its integer (qdq) twin hold bit-identical weights.
        if cfg.block_size:
            moved = np.moveaxis(w, layer.out_axis, 0).shape
            q = quantize_blocks_params(f.reshape(moved), cfg.bits, cfg.quantizer, cfg.block_size,
                                       w.dtype)
        else:
            q = quantize_params(f, cfg.bits, cfg.quantizer, cfg.granularity, w.dtype)
        gptq = None
        if cfg.method == "udfc+" and cfg.plus.gptq:
            gptq = gptq_layer(layer, f, q, moments,
                              [int(d) for d in ctx.inits[layer.weight].dims],
                              cfg.plus.spatial, cfg.plus.gptq_max_inputs)
            q = gptq or q
        if results is not None:
            results[name] = QuantizedWeight(layer.weight, layer.out_axis, q)
        fq = np.asarray(q.dequantized, dtype=np.float64).reshape(f.shape)
        norm = float(np.linalg.norm(f))
        entry: dict[str, Any] = {"bits": cfg.bits, "quantizer": cfg.quantizer,
                                 "granularity": "block" if cfg.block_size else cfg.granularity,
                                 "block_size": cfg.block_size,
                                 "quant_error": float(np.linalg.norm(fq - f) / norm)
                                 if norm else 0.0, "scale_compensated": False}
        if cfg.method == "udfc+":
            entry["gptq"] = gptq is not None
        out[name] = entry
        if cfg.method == "udfc":
            stats, stats_kind = layer_stats(layer, ctx.inits, ctx.consumers, outputs, folded)
            scales = eq14_21_quantization_scale(f, fq, stats, cfg.alpha2)
            found, reason = absorbers(node, ctx, cross_channel=False)
            info = ctx.tensors.get(node.output[0])
            classes = None if info is None or info.slots is None else root[info.slots]
            if reason is None and (classes is None or len(np.unique(classes)) != len(classes)):
                reason = "output channels are not distinct classes"
            if reason is None:
                skipped = apply_scales(ctx, found, classes, scales)
                reason = f"channels missing from {', '.join(skipped)}" if skipped else None
                curved = sorted({op for a in found for op in a.nonlinear})
                if curved:  # not positively homogeneous: the scale is an approximation
                    entry["activations"] = curved
                if found and found[0].layer.node.op_type == "BatchNormalization":
                    entry["scale_into"] = "batchnorm"  # before a curved activation: exact
            entry.update(scale_compensated=reason is None, stats=stats_kind)
            if reason:
                entry["reason"] = reason
        if cfg.method == "udfc+":
            entry["bias_corrected"] = udfc_plus.bias_correction(ctx, layer, f, fq, moments,
                                                                cfg.plus)
        _write_filters(ctx, layer, fq)
    return out


def _write_filters(ctx: ChannelAnalysis, layer, filters: np.ndarray) -> None:
    init = ctx.inits[layer.weight]
    w = tensor_array(init)
    moved_shape = np.moveaxis(w, layer.out_axis, 0).shape
    new = np.moveaxis(filters.reshape(moved_shape), 0, layer.out_axis)
    set_tensor_array(init, new.astype(w.dtype))
