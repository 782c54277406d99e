"""Per-group pruning ratios under a global FLOPs budget (``--budget-flops B``).

Each prunable group removes its channels in the order the plan would (lowest ``criterion``
score first). For every group and every step of a ratio grid the *predicted error* is the
share of the group's activation variance that the udfc+ reconstruction cannot recover,
``sum_{j pruned} residual_j / sum_i var_i``, from the same moments udfc+ uses (data-free
propagation, or a calibration set). The exact MACs after pruning are a sum over weight layers
of ``MACs x kept_in/in x kept_out/out`` (``kept_out/out`` only for grouped convolutions).
A greedy walk then advances, one grid step at a time, the group with the smallest increase in
predicted error per MAC saved, until ``MACs after <= B x MACs before``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from onnx_udfc.channels.activations import activation_tensor, pruning_moments
from onnx_udfc.channels.analysis import ChannelAnalysis, ChannelGroup
from onnx_udfc.channels.plan import make_plan, removal_order
from onnx_udfc.channels.stats import weight_layer
from onnx_udfc.config import PruneOptions
from onnx_udfc.core.blas import single_blas_thread
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.moments.drift import DriftProbe
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.reconstruction import RIDGE, reconstruction
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.ops.cost import layer_stats

STEPS = 16  # ratio grid per group: multiples of 1/STEPS of its size
MAX_RATIO = 0.9


def _layers(ctx: ChannelAnalysis) -> list[tuple[float, np.ndarray | None, np.ndarray | None,
                                                bool]]:
    """Per weight layer: MACs, input and output classes (one per channel slot, None when not
    tracked), and whether it is grouped (its MACs scale with the output channels only)."""
    root = ctx.roots()
    stats = {s.name: s for s in layer_stats(ctx.model, ctx.shapes)}
    out = []
    for node in ctx.graph.node:
        s = stats.get(node.name or node.output[0])
        if s is None:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        cls = []
        for name in (node.input[0], node.output[0]):
            info = ctx.tensors.get(name)
            cls.append(None if info is None or info.slots is None else root[info.slots])
        out.append((float(s.macs), cls[0], cls[1], group > 1))
    return out


def _group_error(m: TensorMoments | None, order: np.ndarray, members: np.ndarray,
                 counts: list[int]) -> np.ndarray:
    """Predicted error after removing the first ``k`` of ``order`` for each ``k`` in counts
    (``members``: the group's classes in the tensor's channel order)."""
    pos = {int(c): i for i, c in enumerate(members.tolist())}
    if m is None or m.mean.size != members.size:
        return np.asarray([float(k) / max(len(members), 1) for k in counts])
    var = m.var
    total = float(var.sum()) or 1.0
    out = []
    for k in counts:
        if k == 0:
            out.append(0.0)
            continue
        pruned = np.asarray(sorted(pos[int(c)] for c in order[:k]))
        kept = np.setdiff1d(np.arange(members.size), pruned)
        _, _, rel = reconstruction(m, kept, pruned, RIDGE)
        out.append(float((rel * var[pruned]).sum()) / total)
    return np.asarray(out)


def allocate(ctx: ChannelAnalysis, groups: list[ChannelGroup], budget: float,
             config: PruneOptions, source: MomentSource | None = None,
             steps: int = STEPS, scores: np.ndarray | None = None,
             moments: dict[str, TensorMoments] | None = None,
             measured: dict[str, Any] | None = None) -> dict[int, float]:
    """Group id -> pruning ratio (every group; 0 for those left whole) so that MACs after
    <= ``budget`` x MACs before under the cost model of :func:`predicted_macs`.

    The predicted errors read ``moments`` (of the producers' activations) when given, else
    ask ``source`` (the run's; a data-free ``auto`` one when None). ``measured``, when given,
    receives how the groups' output weights were measured (:func:`group_drift`)."""
    if not 0.0 < budget <= 1.0:
        raise UdfcError(f"FLOPs budget must be in (0, 1], got {budget}")
    with single_blas_thread():
        return _allocate(ctx, groups, budget, config, source or MomentSource(ctx.model), steps,
                         scores, moments, measured)


def _allocate(ctx: ChannelAnalysis, groups: list[ChannelGroup], budget: float,
              config: PruneOptions, source: MomentSource, steps: int,
              scores: np.ndarray | None, moments: dict[str, TensorMoments] | None,
              measured: dict[str, Any] | None) -> dict[int, float]:
    if scores is None:
        scores = ctx.class_scores("l2" if config.criterion == "l2" else "l1")
    base = make_plan(ctx, groups, PruneOptions(0.0, config.criterion, exclude=list(config.exclude),
                                               prune_coupled=config.prune_coupled), scores)
    if moments is None:
        moments = pruning_moments(ctx, source, "budget")
    root = ctx.roots()
    by_tensor: dict[str, TensorMoments | None] = {}
    producer_of = {p.node.name or p.tensor: p for p in ctx.producers}
    layers = _layers(ctx)
    ncls = len(scores)
    macs0 = sum(x[0] for x in layers)
    # per layer: slot counts of every class (inputs, outputs)
    def counts(cls: np.ndarray | None) -> np.ndarray:
        return np.zeros(ncls) if cls is None else np.bincount(cls, minlength=ncls)[:ncls]
    cin = np.stack([counts(x[1]) for x in layers])  # [L, classes]
    cout = np.stack([counts(x[2]) for x in layers])
    nin, nout = np.maximum(cin.sum(1), 1), np.maximum(cout.sum(1), 1)
    macs = np.asarray([x[0] for x in layers])
    grouped = np.asarray([x[3] for x in layers])

    plans: list[tuple[int, list[np.ndarray], np.ndarray]] = []  # id, removed per step, errors
    for gp in base.groups:
        g = gp.group
        cand = np.asarray([c for c in g.classes.tolist() if c not in gp.fixed], dtype=np.int64)
        if g.blocks is not None or cand.size == 0 or g.size < 2:
            continue
        order = removal_order(g, cand, scores)
        top = min(cand.size, g.size - 1, int(MAX_RATIO * g.size))
        ks = sorted({min(top, int(round(i * g.size / steps))) for i in range(steps + 1)})
        if len(g.producers) == 1 and g.producers[0] in producer_of:
            p = producer_of[g.producers[0]]
            t = activation_tensor(p.node, ctx)
            if t not in by_tensor:
                by_tensor[t] = moments.get(t)
            cand_m = by_tensor[t]
            members = root[p.slots]
            if cand_m is not None and len(np.unique(members)) == members.size:
                errs = _group_error(cand_m, order, members, ks)
            else:
                errs = np.asarray(ks, float) / g.size
        else:  # several producers (coupled): no reconstruction, the channel share instead
            errs = np.asarray(ks, float) / g.size
        plans.append((g.id, [order[:k] for k in ks], errs))
    weights, how = group_drift(ctx, {gid: rs[-1] for gid, rs, _ in plans}, source)
    plans = [(gid, rs, errs * weights.get(gid, 1.0)) for gid, rs, errs in plans]
    if measured is not None:
        measured.update({"sensitivity": how, "group_drift": weights})

    def removed_slots(removed_cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cin[:, removed_cls].sum(1), cout[:, removed_cls].sum(1)

    steps_rm = [[removed_slots(r) for r in rs] for _, rs, _ in plans]
    state = [0] * len(plans)
    rin, rout = np.zeros(len(layers)), np.zeros(len(layers))

    def total(a: np.ndarray, b: np.ndarray) -> float:
        fin, fout = 1 - a / nin, 1 - b / nout
        return float((macs * np.where(grouped, fout, fin * fout)).sum())

    current = total(rin, rout)
    target = budget * macs0
    while current > target:
        best, best_rate = None, np.inf
        for i, (_, rs, errs) in enumerate(plans):
            s = state[i]
            if s + 1 >= len(rs):
                continue
            (ai, ao), (bi, bo) = steps_rm[i][s], steps_rm[i][s + 1]
            after = total(rin - ai + bi, rout - ao + bo)
            saved = current - after
            if saved <= 0:
                continue
            rate = (errs[s + 1] - errs[s]) / saved
            if rate < best_rate:
                best, best_rate, best_after = i, rate, after
        if best is None:
            raise UdfcError(f"cannot reach a FLOPs budget of {budget:g}: at most "
                            f"{current / macs0:.3f} of the FLOPs remain after pruning every "
                            f"prunable group to {MAX_RATIO:.0%}")
        s = state[best]
        (ai, ao), (bi, bo) = steps_rm[best][s], steps_rm[best][s + 1]
        rin, rout = rin - ai + bi, rout - ao + bo
        state[best] = s + 1
        current = best_after
    sizes = {g.id: g.size for g in groups}
    ratios = {g.id: 0.0 for g in groups}  # every group: the budget replaces --prune
    ratios.update({gid: len(rs[state[i]]) / sizes[gid] for i, (gid, rs, _) in enumerate(plans)})
    return ratios


def group_drift(ctx: ChannelAnalysis, removable: dict[int, np.ndarray],
                source: MomentSource) -> tuple[dict[int, float], str]:
    """Per group: the network's output drift when its ``removable`` classes are cut off without
    compensation (every channel-mixing layer reading them sees zeros), and how it was measured.
    The predicted error of a step is this times the share of the group's variance that stays
    unrecovered: layers that matter little to the outputs are pruned first. All 1.0 (named)
    when the network cannot run on samples."""
    root = ctx.roots()
    readers: list[tuple[str, int, np.ndarray]] = []  # weight, input axis, input classes
    for node in ctx.graph.node:
        layer = weight_layer(node, ctx.inits)
        info = ctx.tensors.get(node.input[0]) if node.input else None
        if layer is None or info is None or info.slots is None or \
                next((a.i for a in node.attribute if a.name == "group"), 1) > 1:
            continue
        cls = root[info.slots]
        if ctx.inits[layer.weight].dims[layer.in_axis] == cls.size:
            readers.append((layer.weight, layer.in_axis, cls))
    probe = DriftProbe(ctx.model, [w for w, _, _ in readers], source)
    if not probe.available:
        return {}, f"channel share only ({probe.describe()})"
    out = {}
    for gid, classes in removable.items():
        replaced = {}
        for weight, axis, cls in readers:
            cut = np.isin(cls, classes)
            if cut.any():
                w = replaced.get(weight, probe.weights[weight]).copy()
                index = [slice(None)] * w.ndim
                index[axis] = cut
                w[tuple(index)] = 0
                replaced[weight] = w
        out[gid] = probe.drift(replaced) if replaced else 0.0
    return out, probe.describe()


def predicted_macs(ctx: ChannelAnalysis, removed: np.ndarray) -> tuple[float, float]:
    """(MACs before, MACs after) of a removal mask over classes (the budget's cost model)."""
    before = after = 0.0
    for macs, cin, cout, grouped in _layers(ctx):
        fin = 1.0 if cin is None else float(np.mean(~removed[cin]))
        fout = 1.0 if cout is None else float(np.mean(~removed[cout]))
        before += macs
        after += macs * (fout if grouped else fin * fout)
    return before, after


__all__: Sequence[str] = ("allocate", "predicted_macs")
