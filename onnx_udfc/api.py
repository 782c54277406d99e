"""The public Python API: ``compress`` and the composable passes it is made of.

Example::

    from onnx_udfc import api
    model, report = api.compress("models/digits_cnn_bn.onnx", prune=0.3, bits=6)
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx

from onnx_udfc import pipeline as _pipeline
from onnx_udfc.channels.plan import PrunePlan, make_plan
from onnx_udfc.channels.rewrite import apply_removal
from onnx_udfc.config import CompressConfig, PruneOptions
from onnx_udfc.core import io as _io
from onnx_udfc.core import normalize as _normalize
from onnx_udfc.methods.compensate import compensate_pruning, quantize_model
from onnx_udfc.pipeline import Analysis
from onnx_udfc.report.report import Report

load = _io.load_model
save = _io.save_model
check = _io.check_model
fold_batchnorm = _normalize.fold_batchnorm


def normalize(model: onnx.ModelProto) -> dict[str, int]:
    """Constants and Identity-aliased weights become initializers; shape arithmetic is folded.

    >>> counts = normalize(model)   # {'constants': 40, 'identities': 0, 'folded': 40, ...}
    """
    return _normalize.normalize(model)


def analyse(model: onnx.ModelProto,
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> Analysis:
    """Channel groups of a normalised model.

    >>> a = analyse(model)
    >>> [(g.size, g.prunable, g.coupled) for g in a.groups][:2]
    """
    return _pipeline.analyse(model, {k: list(v) for k, v in (input_shapes or {}).items()})


def plan(analysis: Analysis, ratio: float = 0.0, *,
         group_ratios: dict[int, float] | None = None, **options: Any) -> PrunePlan:
    """Choose the channels to remove: ``ratio`` per group (or ``group_ratios`` by group id),
    plus the other pruning options of :class:`~onnx_udfc.config.PruneOptions` (``criterion``,
    ``exclude``, ``prune_coupled``, ``round_to``).

    >>> p = plan(a, 0.5, criterion="l2", exclude=[r"layer3"])
    """
    return make_plan(analysis.channels, analysis.groups, PruneOptions(ratio=ratio, **options),
                     group_ratios=group_ratios)


def reconstruct(analysis: Analysis, pruning: PrunePlan, method: str = "udfc",
                alpha1: float = 0.01,
                folded: dict[str, _normalize.BatchNormStats] | None = None) -> dict[str, dict]:
    """Fold the reconstruction of every planned channel into the layers that read it (Eq. 8);
    call before :func:`prune`. ``method`` is ``udfc`` (Eq. 20) or ``nm`` (Neuron Merging);
    ``folded`` are the statistics :func:`fold_batchnorm` returned. Returns per-layer entries
    (``compensated``, ``reason``, ``predicted_error``, ...).

    >>> info = reconstruct(a, p, "udfc"); prune(a, p)
    """
    config = _resolved(method=method, alpha1=alpha1)
    return compensate_pruning(analysis.channels, pruning.removed,
                              _pipeline.method_config(config), folded)


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
    config = _resolved(method=method, bits=bits, quantizer=quantizer, granularity=granularity,
                       alpha2=alpha2, quant_exclude=list(exclude))
    return quantize_model(model, _pipeline.method_config(config),
                          {k: list(v) for k, v in input_shapes.items()} if input_shapes else None,
                          folded, list(exclude))


def _resolved(**options: Any) -> CompressConfig:
    """The validated configuration of a single pass (float target: no storage checks)."""
    config = CompressConfig.resolve("paper", "fake", **options)
    config.validate()
    return config


def verify(original: _io.ModelSource, compressed: _io.ModelSource, **options):
    """Compare two models in ONNX Runtime (see :func:`onnx_udfc.report.verify.verify`).

    >>> result = verify("a.onnx", model, data="inputs.npz")
    >>> result.fidelity[0].cosine, result.accuracy_after
    """
    from onnx_udfc.report.verify import verify as _verify

    return _verify(original, compressed, **options)


def compress(model: _io.ModelSource, *, preset: str | None = None, target: str | None = None,
             progress: Callable[[str], None] | None = None, check: bool = True,
             **options: Any) -> tuple[onnx.ModelProto, Report]:
    """Load, analyse, plan, compensate, prune, quantize, store and check; returns the
    compressed model and its report.

    ``preset`` (effort: ``fast|balanced|best|max|paper``, default ``balanced``) and ``target``
    (storage: ``fake|int8|int4``, default ``int8``, ``fake`` for ``paper``) choose the
    recommended settings; every other keyword overrides one option, by its short name
    (``prune=0.3``, ``bits=6``, ``method="udfc"``, see :data:`onnx_udfc.config.SHORT_NAMES`)
    or its dotted name (``**{"method.seed": 1}``). ``calibration`` may be an array, a dict or a
    ``.npz`` path.

    A ``ModelProto`` argument is copied, never modified. Raises :class:`UdfcError` on bad input
    before anything is changed. ``check=False`` skips the in-memory ``onnx.checker`` run (the
    CLI checks the written file instead).

    >>> model, report = compress("models/digits_cnn_bn.onnx")            # int8, udfc+
    >>> model, report = compress("models/digits_cnn_bn.onnx", prune=0.3, bits=6)
    >>> model, report = compress("models/digits_cnn_bn.onnx", preset="paper", prune=0.3, bits=4)
    """
    config = CompressConfig.resolve(preset, target, **options)
    config.validate()
    return _pipeline.run(config, model, progress, check)


def save_compressed(model: onnx.ModelProto, path: str | os.PathLike, *,
                    source: str | os.PathLike | None = None,
                    external_data: bool | None = None, check: bool = True) -> int:
    """Save atomically (after the full checker passed on the written file when ``check``) and
    return the size on disk in bytes (model plus external data)."""
    out = _io.save_model(model, path, source=source, external_data=external_data, check=check)
    return _io.disk_size(out)
