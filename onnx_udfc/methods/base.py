"""One interface for every compression method, and the registry that names them.

The shared work (which layers can take a correction, and why not; the quantization grid;
writing the weights back) runs once in :mod:`onnx_udfc.methods.compensate`. A method holds only
its own maths: how a pruned layer's channels are rebuilt from the kept ones, how a weight is
rounded, and what goes into the next layers after rounding. Adding a method is one subclass and
one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from onnx_udfc.channels.absorbers import Absorber
from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.channels.stats import LayerWeights
from onnx_udfc.config import METHODS
from onnx_udfc.core.normalize import BatchNormStats
from onnx_udfc.quant.grids import QuantResult


@dataclass
class PruneJob:
    """One pruned producer that passed the shared checks: its absorbers are known."""

    producer: Any  # channels.analysis.Producer
    layer: LayerWeights
    absorbers: list[Absorber]
    classes: np.ndarray  # slot class of each output channel
    kept: np.ndarray  # output channel indices kept
    pruned: np.ndarray  # and removed
    stats: Any  # channels.stats.ChannelStats of the layer's outputs
    stats_kind: str


@dataclass
class QuantJob:
    """One weight layer being quantized."""

    node: onnx.NodeProto
    layer: LayerWeights
    filters: np.ndarray  # [outputs, fan-in] float64, before rounding
    rounded: np.ndarray | None = None  # the same, on the grid (set after rounding)
    entry: dict[str, Any] = field(default_factory=dict)  # the report's per-layer entry


@dataclass
class RunContext:
    """What a method may read while compensating one model."""

    ctx: ChannelAnalysis
    config: Any  # methods.compensate.MethodRun
    folded: dict[str, BatchNormStats]
    outputs: set[str]
    moments: dict | None = None
    source: Any = None  # moments.source.MomentSource
    detail: Callable[[str], None] | None = None  # a progress counter on a terminal
    removed: np.ndarray | None = None  # per channel class, what the plan prunes


class Method:
    """Base: no compensation. Subclasses override the hooks their maths needs."""

    name: ClassVar[str] = ""
    # udfc+: rebuild channels past a depthwise Conv or a reader's BN, and within the groups of
    # a grouped Conv (channels.absorbers: crossed, channel_partition)
    through_channel_separate: ClassVar[bool] = False

    def prepare_pruning(self, run: RunContext) -> None:
        """Before the first pruned layer (e.g. read the moments once)."""

    def reconstruct(self, run: RunContext, job: PruneJob, entry: dict[str, Any]) -> bool:
        """Fold the reconstruction of ``job.pruned`` into ``job.absorbers`` and fill
        ``entry``; return False to defer the layer to :meth:`finish_pruning`."""
        entry["reason"] = f"method {self.name}: no compensation"
        return True

    def finish_pruning(self, run: RunContext, removed: np.ndarray,
                       deferred: list[PruneJob]) -> dict[str, dict]:
        """Layers deferred by :meth:`reconstruct` (a fit over the whole network)."""
        return {}

    def prepare_quantization(self, run: RunContext) -> None:
        """Before the first layer is quantized (e.g. read the moments once)."""

    def round(self, run: RunContext, job: QuantJob, grid: QuantResult) -> QuantResult:
        """The layer's rounding on ``grid`` (default: round to nearest, as given)."""
        return grid

    def after_rounding(self, run: RunContext, job: QuantJob) -> None:
        """Compensate the rounding error in the layers that read ``job`` (before those are
        quantized in turn)."""


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name not in METHODS:
        raise ValueError(f"method '{method.name}' is not in onnx_udfc.config.METHODS")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    return REGISTRY[name]
