"""Mixed precision under a file-size budget (``--budget-size S``).

Each weight layer may stay in float, or be stored at 8 or 4 bits. The allocation is driven by
*measured* sensitivity: every layer alone is rounded to 4 bits and the whole network is run in
ONNX Runtime on the run's samples (:class:`onnx_udfc.moments.drift.DriftProbe`: one session,
the candidate weights fed as inputs). Its cost is the network's output drift, the mean squared
per-channel error (the guard's metric, squared so that independent layers add).

The 8-bit cost is the 4-bit one scaled by the squared ratio of the grid steps, ``(15 / 255)^2``
for the same range (rounding noise is uniform with variance ``step^2 / 12``), so one run per
layer suffices. A greedy walk then starts from float everywhere and takes, one at a time, the
step (float -> 8 bits, or 8 -> 4 bits) with the least added drift per byte saved, until the
file fits ``S x`` the original's size. Layers left in float are the ones the budget could
afford to spare; a budget that 4 bits everywhere cannot meet is refused in one line.

``--float-share S`` (the recommended presets' int8/int4 targets) is the same walk with one
integer width, ``--bits``: every layer at that width, plus up to ``S x`` the original's size
spent on keeping in float the layers whose rounding moves the outputs most per byte. On a
compact detector a few small layers (the first convolution, the heads) carry most of the
rounding's effect on the outputs.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnx_udfc.channels.stats import LayerWeights
from onnx_udfc.config import QuantOptions
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import approx_size, graph_inputs
from onnx_udfc.methods.coverage import quantizable, recurrent_weights
from onnx_udfc.moments.drift import DriftProbe
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.quant.grids import quantize_params

WIDTHS = (8, 4)  # integer widths a layer may take; None is float
NODE_BYTES, INIT_BYTES = 128, 64  # per node and per initializer, as io.approx_size counts them


class BudgetUnreachable(UdfcError):
    """Even 4 bits everywhere leave the file over the size budget."""


@dataclass
class Candidate:
    """One weight that the budget may store at 8 or 4 bits or leave in float."""

    key: str  # the node's name (``node:W`` / ``node:R`` for recurrent weights)
    layer: LayerWeights
    shape: tuple[int, ...]
    itemsize: int
    error4: float = 0.0  # output drift with this weight alone at 4 bits
    measured: bool = False  # --float-share measures only the layers that could stay float

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def stored_bytes(self, bits: int | None, quant: QuantOptions) -> int:
        """Bytes on disk: codes (two per byte at <= 4 bits), scales and zero points, and the
        DequantizeLinear node with its extra initializers (as :func:`approx_size` counts)."""
        if bits is None:
            return self.numel * self.itemsize
        codes = (self.numel + 1) // 2 if bits <= 4 else self.numel
        if quant.block_size:
            scales = -(-self.numel // quant.block_size)
        else:
            scales = self.shape[self.layer.out_axis] if quant.granularity == "channel" else 1
        asymmetric = quant.quantizer == "asymmetric"
        return codes + scales * (self.itemsize + asymmetric) + NODE_BYTES + \
            INIT_BYTES * (1 + asymmetric)

    def error(self, bits: int | None) -> float:
        if bits is None:
            return 0.0
        return self.error4 * ((2 ** 4 - 1) / (2 ** bits - 1)) ** 2


@dataclass
class MixedPlan:
    """The allocation: bits per layer (None: float) and what it was based on."""

    bits: dict[str, int | None]
    budget: float
    size_before: int
    predicted_size: int
    sensitivity: str  # "measured on <source> samples" or the weight-error fallback, named
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    float_share: float | None = None  # --float-share: the share of the original kept in float

    @property
    def float_reason(self) -> str:
        """Why a layer of this plan stays in float (the report's ``float_layers``)."""
        if self.float_share is None:
            return ("kept in float by --budget-size: the file fits without rounding it, and "
                    "it costs the most output drift per byte saved")
        return (f"kept in float by --float-share {self.float_share:g}: its rounding moves the "
                "outputs the most per byte, and its float copy fits the share")

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for b in self.bits.values():
            label = "float" if b is None else f"{b}-bit"
            counts[label] = counts.get(label, 0) + 1
        return {"budget_size": None if self.float_share is not None else self.budget,
                "float_share": self.float_share,
                "predicted_size": self.predicted_size,
                "predicted_ratio": self.predicted_size / self.size_before,
                "sensitivity": self.sensitivity, "counts": counts,
                "predicted_error": sum(v["error"] for v in self.layers.values()),
                "layers": self.layers}


@dataclass
class Sensitivities:
    """Measured 4-bit drifts by layer key, kept across the candidates of ``--select-method``:
    they prune the same channels and differ only in the fitted weights, so the first one's
    measurement serves the next (a layer of another shape is measured again)."""

    errors: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    described: str = ""

    def reuse(self, c: Candidate) -> bool:
        """Fill ``c`` from an earlier measurement of the same weight shape, if there is one."""
        known = self.errors.get(c.key)
        if known is None or known[0] != c.shape:
            return False
        c.error4, c.measured = known[1], True
        return True


def candidates(model: onnx.ModelProto, exclude: list[str]) -> list[Candidate]:
    """The weights the quantize loop would take, in graph order (same rules, same keys)."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in graph_inputs(model)}
    patterns = [re.compile(p) for p in exclude]
    found: list[tuple[str, LayerWeights]] = []
    for node in model.graph.node:
        layer, _ = quantizable(node, inits, inputs, patterns)
        if layer is not None:
            found.append((node.name or node.output[0], layer))
        found += [(key, lw) for key, lw, _ in recurrent_weights(node, inits, inputs, patterns)
                  if lw is not None]
    out = []
    for key, layer in found:
        t = inits[layer.weight]
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        out.append(Candidate(key, layer, tuple(int(d) for d in t.dims), itemsize))
    return out


def allocate_bits(model: onnx.ModelProto, quant: QuantOptions, budget: float,
                  size_before: int, source: MomentSource, exclude: list[str],
                  progress: Callable[[int, int], None] | None = None,
                  known: Sensitivities | None = None) -> MixedPlan:
    """Bits per weight layer so that the stored file is at most ``budget x size_before``
    (``known``: drifts measured earlier in the command, reused and added to)."""
    cands = candidates(model, exclude)
    sensitivity = measure_sensitivity(model, cands, quant, source, progress, known)
    bits, size = _greedy(model, cands, quant, WIDTHS, int(budget * size_before))
    if size > budget * size_before:
        raise BudgetUnreachable(
            f"--budget-size {budget:g} cannot be met by quantization alone: every weight at 4 "
            f"bits gives {size / size_before:.3f}x the original; prune too (--prune R or "
            "--budget-flops B) or raise the budget")
    return MixedPlan(bits, budget, size_before, size, sensitivity, _layers(cands, bits, quant))


def allocate_float_share(model: onnx.ModelProto, quant: QuantOptions, share: float,
                         size_before: int, source: MomentSource, exclude: list[str],
                         progress: Callable[[int, int], None] | None = None,
                         known: Sensitivities | None = None) -> MixedPlan:
    """Every weight layer at ``quant.bits``, except the ones kept in float: the most output
    drift per byte first, while the float copies add at most ``share x size_before``
    (``known`` as in :func:`allocate_bits`)."""
    assert quant.bits is not None
    cands = candidates(model, exclude)
    allowance = int(share * size_before)
    # A layer whose float copy alone outgrows the allowance is stored at --bits whatever its
    # drift: only the others are measured (error 0 puts it first in the walk to --bits).
    fits = [c for c in cands
            if c.stored_bytes(None, quant) - c.stored_bytes(quant.bits, quant) <= allowance]
    sensitivity = measure_sensitivity(model, fits, quant, source, progress, known) if fits else \
        "not measured: no layer's float copy fits the share"
    fixed = approx_size(model) - sum(c.stored_bytes(None, quant) for c in cands)
    target = fixed + sum(c.stored_bytes(quant.bits, quant) for c in cands) + allowance
    bits, size = _greedy(model, cands, quant, (quant.bits,), target)
    return MixedPlan(bits, target / size_before, size_before, size, sensitivity,
                     _layers(cands, bits, quant), float_share=share)


def _greedy(model: onnx.ModelProto, cands: list[Candidate], quant: QuantOptions,
            widths: tuple[int, ...], target: int) -> tuple[dict[str, int | None], int]:
    """From float everywhere, take the step (float -> ``widths[0]``, or to the next narrower
    width) with the least added drift per byte saved, until the file fits ``target`` bytes or
    no step is left. Returns the bits per layer and the predicted size."""
    fixed = approx_size(model) - sum(c.stored_bytes(None, quant) for c in cands)
    bits: dict[str, int | None] = {c.key: None for c in cands}
    size = fixed + sum(c.stored_bytes(None, quant) for c in cands)
    steps: list[tuple[float, int, int | None]] = []  # (drift per byte saved, index, from)

    def narrower(current: int | None) -> int | None:
        return widths[0] if current is None else next((w for w in widths if w < current), None)

    def push(i: int, current: int | None) -> None:
        nxt = narrower(current)
        if nxt is None:
            return
        c = cands[i]
        saved = c.stored_bytes(current, quant) - c.stored_bytes(nxt, quant)
        added = c.error(nxt) - c.error(current)
        heapq.heappush(steps, (added / max(saved, 1), i, current))

    for i in range(len(cands)):
        push(i, None)
    while size > target and steps:
        _, i, current = heapq.heappop(steps)
        c, nxt = cands[i], narrower(current)
        size -= c.stored_bytes(current, quant) - c.stored_bytes(nxt, quant)
        bits[c.key] = nxt
        push(i, nxt)
    return bits, size


def _layers(cands: list[Candidate], bits: dict[str, int | None], quant: QuantOptions
            ) -> dict[str, dict[str, Any]]:
    return {c.key: {"bits": bits[c.key], "error": c.error(bits[c.key]),
                    "error_at_4_bits": c.error4 if c.measured else None,
                    "bytes": c.stored_bytes(bits[c.key], quant)} for c in cands}


def measure_sensitivity(model: onnx.ModelProto, cands: list[Candidate], quant: QuantOptions,
                        source: MomentSource,
                        progress: Callable[[int, int], None] | None = None,
                        known: Sensitivities | None = None) -> str:
    """Fill each candidate's ``error4``; returns how it was measured. When the network cannot
    be run on samples, the weight's own relative rounding error stands in (named). With
    ``known``, layers measured before are taken from it and the new ones added."""
    todo = [c for c in cands if known is None or not known.reuse(c)]
    described = known.described if known is not None else ""
    if todo:
        described = _measure(model, todo, quant, source, progress)
        if known is not None:
            known.errors.update({c.key: (c.shape, c.error4) for c in todo})
            known.described = known.described or described
    reused = len(cands) - len(todo)
    return described + (f"; {reused} of {len(cands)} layers' drifts reused from the first "
                        "candidate's measurement" if reused else "")


def _measure(model: onnx.ModelProto, cands: list[Candidate], quant: QuantOptions,
             source: MomentSource, progress: Callable[[int, int], None] | None) -> str:
    probe = DriftProbe(model, [c.layer.weight for c in cands], source)
    for i, c in enumerate(cands):
        w = probe.weights[c.layer.weight]
        rounded = _rounded(c, w, quant)
        if probe.available:
            c.error4 = probe.drift({c.layer.weight: rounded})
        else:
            c.error4 = float(np.sum((rounded - w) ** 2) / max(float(np.sum(w ** 2)), 1e-30))
        c.measured = True
        if progress is not None:
            progress(i + 1, len(cands))
    if probe.available:
        return probe.describe()
    return f"weight rounding error ({probe.describe()})"


def _rounded(c: Candidate, w: np.ndarray, quant: QuantOptions) -> np.ndarray:
    """``w`` rounded to 4 bits on the run's grid, in its own layout and dtype."""
    filters = np.moveaxis(w.astype(np.float64), c.layer.out_axis, 0).reshape(
        w.shape[c.layer.out_axis], -1)
    q = quantize_params(filters, 4, quant.quantizer, quant.granularity, w.dtype)
    moved = np.moveaxis(w, c.layer.out_axis, 0).shape
    return np.moveaxis(np.asarray(q.dequantized).reshape(moved), 0,
                       c.layer.out_axis).astype(w.dtype)
