"""``udfc+`` as a :class:`~onnx_udfc.methods.base.Method`: least squares on the run's activation
moments for pruning (or the sequential fit), GPTQ rounding and bias correction for
quantization. The maths lives in :mod:`onnx_udfc.methods.plus`,
:mod:`onnx_udfc.methods.sequential` and :mod:`onnx_udfc.quant.gptq_layer`."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnx_udfc.channels.absorbers import routes
from onnx_udfc.channels.activations import channel_axes, pruning_moments
from onnx_udfc.core.ort import refusals
from onnx_udfc.methods import plus
from onnx_udfc.methods.base import Method, PruneJob, QuantJob, RunContext, register
from onnx_udfc.moments.source import refusal_cause
from onnx_udfc.quant.gptq_layer import gptq_layer
from onnx_udfc.quant.grids import QuantResult


class UdfcPlus(Method):
    name = "udfc+"
    through_channel_separate = True

    def prepare_pruning(self, run: RunContext) -> None:
        cfg = run.config
        if run.source is None:
            run.source = plus.moment_source(run.ctx.model, cfg.plus, cfg.calibration)
        if cfg.plus.sequential:
            run.moments = {}
            return
        if run.moments is None:
            run.moments = pruning_moments(run.ctx, run.source, "compensate", run.removed)
        # past a depthwise Conv the channels are rebuilt after it: read there too, before
        # any layer changes (the plan's moments hold the producers' own tensors only)
        missing = [t for t in plus.separate_tensors(run.ctx, run.removed) if t not in run.moments]
        if missing:
            run.moments = {**run.moments, **run.source.moments(
                run.ctx.model, run.ctx.shapes, missing, stage="compensate",
                axes=channel_axes(run.ctx, missing))}

    def reconstruct(self, run: RunContext, job: PruneJob, entry: dict[str, Any]) -> bool:
        if run.config.plus.sequential:
            return False
        entry.update(_one_shot(run, job))
        return True

    def finish_pruning(self, run: RunContext, removed: np.ndarray,
                       deferred: list[PruneJob]) -> dict[str, dict]:
        from onnx_udfc.methods.sequential import sequential_pruning

        cfg = run.config.plus
        todo = [(j.producer, group, j.classes, j.kept, j.pruned) for j in deferred
                for _, group in routes(j.absorbers)]
        try:
            feed = run.source.sample_feed(run.ctx.model, cfg.seq_limit)
            # with real inputs every channel is refitted; on synthetic ones only the pruned
            # (refitting the kept ones to synthetic data lost 9 points at 50 % on ResNet-56)
            return sequential_pruning(run.ctx, removed, todo, feed, run.source.anchored,
                                      cfg.seq_lam, cfg.seq_const_scale,
                                      full=run.source.refit_kept, output_fit=cfg.seq_output,
                                      detail=run.detail)
        except refusals() as exc:
            # A refused feed fails on the first run, on the original network, before any fit
            # is written: the one-shot fit on propagated moments takes every layer instead.
            run.source.fall_back("compensate", refusal_cause(exc), failed="sequential")
        run.moments = pruning_moments(run.ctx, run.source, "compensate", removed)
        return {job.producer.node.name or job.producer.tensor: _one_shot(run, job)
                for job in deferred}

    def prepare_quantization(self, run: RunContext) -> None:
        cfg = run.config
        if run.source is None:
            run.source = plus.moment_source(run.ctx.model, cfg.plus, cfg.calibration)
        run.moments = plus.quant_moments(run.ctx.model, run.ctx, run.source, cfg.plus)

    def round(self, run: RunContext, job: QuantJob, grid: QuantResult) -> QuantResult:
        cfg = run.config.plus
        rounded = None
        if cfg.gptq:
            rounded = gptq_layer(job.layer, job.filters, grid, run.moments or {},
                                 [int(d) for d in run.ctx.inits[job.layer.weight].dims],
                                 cfg.spatial, cfg.gptq_max_inputs)
        job.entry["gptq"] = rounded is not None
        return rounded or grid

    def after_rounding(self, run: RunContext, job: QuantJob) -> None:
        job.entry["bias_corrected"] = plus.bias_correction(
            run.ctx, job.layer, job.filters, job.rounded, run.moments or {}, run.config.plus)


def _one_shot(run: RunContext, job: PruneJob) -> dict[str, Any]:
    """The least-squares fit of one layer on the run's moments: its report entry."""
    return plus.plus_pruning(run.ctx, job.producer, job.absorbers, job.classes, job.kept,
                             job.pruned, run.moments or {}, run.config.plus)


register(UdfcPlus())
