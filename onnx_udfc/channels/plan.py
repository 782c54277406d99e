"""Pruning plans: which channel classes of each group go, by ratio and criterion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_udfc.channels.analysis import ChannelAnalysis, ChannelGroup
from onnx_udfc.config import PruneOptions, check_prune
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.ort import conv_channel_block

COUPLED_REASON = "tied across layers by a residual/elementwise coupling (use --prune-coupled)"


@dataclass
class GroupPlan:
    group: ChannelGroup
    ratio: float
    removed: np.ndarray  # class ids
    fixed: dict[int, str]  # class id -> reason, after exclusions and the coupling policy

    @property
    def kept(self) -> int:
        return self.group.size - len(self.removed)


@dataclass
class PrunePlan:
    groups: list[GroupPlan]
    removed: np.ndarray  # bool mask over class ids (slot roots)
    criterion: str

    @property
    def removed_count(self) -> int:
        return int(sum(len(g.removed) for g in self.groups))


def removal_count(size: int, ratio: float, round_to: int = 1) -> int:
    """Channels to remove from a group of ``size``: the nearest count to ``ratio``, keeping at
    least one channel, and a multiple of ``round_to`` kept when asked."""
    remove = min(int(math.floor(ratio * size + 0.5)), size - 1)
    if round_to > 1 and remove > 0:
        keep = size - remove
        keep = min(size, max(round_to, int(round(keep / round_to)) * round_to))
        remove = size - keep
    return max(remove, 0)


def make_plan(analysis: ChannelAnalysis, groups: list[ChannelGroup],
              config: PruneOptions, scores: np.ndarray | None = None,
              group_ratios: dict[int, float] | None = None) -> PrunePlan:
    """``scores``: per class, lowest pruned first (default: the filters' l1/l2 norms; the
    ``recon`` criterion needs them from :func:`onnx_udfc.channels.select.reconstruction_scores`).
    ``group_ratios``: a ratio per group id (``--budget-flops``), ``config.ratio`` elsewhere."""
    group_ratios = group_ratios or {}
    check_prune(config, group_ratios)
    if scores is None:
        if config.criterion == "recon" and (config.ratio > 0 or any(group_ratios.values())):
            raise UdfcError("criterion recon needs scores (onnx_udfc.channels.select)")
        # auto without the run's moments is l1; with nothing pruned any order will do
        scores = analysis.class_scores("l2" if config.criterion == "l2" else "l1")
    excluded: set[int] = set()
    for pattern in config.exclude:
        excluded |= analysis.node_classes(pattern)
    removed = np.zeros(len(scores), dtype=bool)
    round_to = conv_channel_block() if config.round_to == "auto" else int(config.round_to)
    plans = []
    for group in groups:
        fixed = dict(group.fixed)
        for c in group.classes.tolist():
            if c in excluded:
                fixed.setdefault(c, "excluded by --exclude")
            if group.coupled and not config.prune_coupled:
                fixed.setdefault(c, COUPLED_REASON)
        ratio = group_ratios.get(group.id, config.ratio)
        candidates = np.asarray([c for c in group.classes.tolist() if c not in fixed],
                                dtype=np.int64)
        count = min(removal_count(group.size, ratio, round_to), len(candidates))
        chosen = _keep_every_tensor(analysis, group, _choose(group, candidates, scores, count),
                                    scores)
        removed[chosen] = True
        plans.append(GroupPlan(group, ratio, chosen, fixed))
    return PrunePlan(plans, removed, config.criterion)


def _keep_every_tensor(analysis: ChannelAnalysis, group: ChannelGroup, chosen: np.ndarray,
                       scores: np.ndarray) -> np.ndarray:
    """Give back the best channel of any tensor that would lose all of them (e.g. one input of
    a Concat whose channels all scored lowest): an empty tensor is not a valid model."""
    if len(chosen) == 0:
        return chosen
    root = analysis.roots()
    gone = set(chosen.tolist())
    for name in group.tensors:
        info = analysis.tensors[name]
        classes = set(root[info.slots].tolist())
        if classes and classes <= gone:
            best = max(classes, key=lambda c: (scores[c], c))
            gone.discard(best)
    return np.asarray(sorted(gone), dtype=np.int64)


def removal_order(group: ChannelGroup, candidates: np.ndarray, scores: np.ndarray
                  ) -> np.ndarray:
    """The candidates in the order they go: lowest score first within each producer's channels
    (``group.parts``), the producers interleaved by the share each has given up, so that any
    prefix takes about the same fraction from every layer of a Concat. Scores of different
    layers are never compared: a layer with smaller filters (BN folded in with another scale)
    would lose all the channels of the group's budget."""
    order = candidates[np.lexsort((candidates, scores[candidates]))]
    if group.parts is None or len(order) == 0:
        return order
    part_of = dict(zip(group.classes.tolist(), group.parts.tolist(), strict=True))
    part_size = np.bincount(group.parts)
    parts = np.asarray([part_of[c] for c in order.tolist()], dtype=np.int64)
    rank = np.zeros(len(order))
    seen = np.zeros(len(part_size), dtype=np.int64)
    for i, p in enumerate(parts.tolist()):
        rank[i] = (seen[p] + 0.5) / part_size[p]
        seen[p] += 1
    return order[np.argsort(rank, kind="stable")]


def _choose(group: ChannelGroup, candidates: np.ndarray, scores: np.ndarray,
            count: int) -> np.ndarray:
    """Lowest-scoring candidates (:func:`removal_order`); the same number from every block of
    a grouped Conv."""
    if count <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    order = removal_order(group, candidates, scores)
    if group.blocks is None:
        return np.sort(order[:count])
    block_of = dict(zip(group.classes.tolist(), group.blocks.tolist(), strict=True))
    nblocks = int(group.blocks.max()) + 1
    per_block = [[c for c in order.tolist() if block_of[c] == b] for b in range(nblocks)]
    each = min(count // nblocks, *(len(p) for p in per_block))
    # Every block must keep at least one channel.
    block_size = group.size // nblocks
    each = min(each, block_size - 1)
    return np.sort(np.asarray([c for p in per_block for c in p[:each]], dtype=np.int64))
