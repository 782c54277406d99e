"""The paper's methods and its baselines, each one closed form per layer.

``prune`` drops channels; ``nm`` merges each pruned channel into its most similar kept one
(Neuron Merging); ``udfc`` is the paper, faithfully: Eq. 20 rebuilds each pruned channel from
all kept ones, Eq. 21 scales each quantized channel, both folded into the next layers."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnx_udfc.channels.absorbers import absorbers, apply_reconstruction, apply_scales
from onnx_udfc.channels.stats import layer_stats
from onnx_udfc.methods.base import Method, PruneJob, QuantJob, RunContext, register
from onnx_udfc.methods.equations import (
    eq14_21_quantization_scale,
    eq20_pruning_coefficients,
    neuron_merging_pairs,
)


class Prune(Method):
    name = "prune"


def fold_reconstruction(run: RunContext, job: PruneJob, entry: dict[str, Any],
                        coefficients: np.ndarray, degenerate: list) -> None:
    """Eq. 8: the pruned channels' coefficients into the absorbers' kept input columns."""
    skipped = apply_reconstruction(run.ctx, job.absorbers, job.classes[job.kept],
                                   job.classes[job.pruned], coefficients)
    entry.update(compensated=not skipped, stats=job.stats_kind,
                 absorbers=[a.layer.node.name for a in job.absorbers],
                 degenerate=[{"channel": int(j), "reason": r} for j, r in degenerate])
    if skipped:
        entry["reason"] = f"channels missing from the input of {', '.join(skipped)}"
    curved = sorted({op for a in job.absorbers for op in a.nonlinear})
    if curved:  # not positively homogeneous: the reconstruction is an approximation
        entry["activations"] = curved


class NeuronMerging(Method):
    name = "nm"

    def reconstruct(self, run: RunContext, job: PruneJob, entry: dict[str, Any]) -> bool:
        pairs = neuron_merging_pairs(job.layer.filters(run.ctx.inits), job.stats, job.kept,
                                     job.pruned)
        entry["merged"] = int((pairs.targets >= 0).sum())
        fold_reconstruction(run, job, entry, pairs.coefficients(job.kept), pairs.degenerate)
        return True


class Udfc(Method):
    name = "udfc"

    def reconstruct(self, run: RunContext, job: PruneJob, entry: dict[str, Any]) -> bool:
        sol = eq20_pruning_coefficients(job.layer.filters(run.ctx.inits), job.stats, job.kept,
                                        job.pruned, run.config.options.alpha1)
        entry["predicted_error"] = float(np.mean(sol.residual))
        fold_reconstruction(run, job, entry, sol.coefficients, sol.degenerate)
        return True

    def after_rounding(self, run: RunContext, job: QuantJob) -> None:
        """Eq. 21: each output channel's least-squares scale, folded into the readers."""
        ctx, entry = run.ctx, job.entry
        stats, stats_kind = layer_stats(job.layer, ctx.inits, ctx.consumers, run.outputs,
                                        run.folded)
        scales = eq14_21_quantization_scale(job.filters, job.rounded, stats,
                                            run.config.options.alpha2)
        found, reason = absorbers(job.node, ctx, cross_channel=False)
        info = ctx.tensors.get(job.node.output[0])
        classes = None if info is None or info.slots is None else ctx.roots()[info.slots]
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


for _method in (Prune(), NeuronMerging(), Udfc()):
    register(_method)
