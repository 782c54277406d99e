"""Sequential udfc+: each layer's reconstruction sees the errors of the layers before it.

Per-layer udfc+ reconstructs a pruned channel of the *original* network from the kept channels
of the *original* network. After the first pruned layer the kept channels are no longer the
original ones: errors pile up. Here the producers are visited in graph order and, for each, the
compressed-so-far network and the original run side by side on the same inputs (the user's
calibration set, or the synthetic BN-anchored samples of :mod:`onnx_udfc.moments.sampled`). Every
original channel ``z`` the absorbers read (kept and pruned) is then regressed on the kept
channels of the compressed network,

    x_z ~ b_z^T x~_K + c_z,   b_z = (C~_KK + lam I)^-1 (C~x_Kz + lam e_z),

the ridge pulling a kept channel toward itself (``e_z``: the unit vector of z when kept, 0 when
pruned). The absorbers' columns become ``W'_K = sum_z W_z b_z^T`` and the constants go into
their bias: the next layer's output is the least-squares fit of the original's, given the
drifted inputs it will really receive.

With synthetic samples the compressed network's BatchNorms normalise by the batch statistics
the *original* network had on those samples (frozen), so an uncompressed network reproduces
the original exactly and only the compression shows as a difference.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.channels.absorbers import (
    Absorber,
    ColumnView,
    channel_partition,
    channel_positions,
    channels_present,
    producer_block,
)
from onnx_udfc.channels.activations import activation_tensor, channel_axes
from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.core.graph_edit import node_reads, with_outputs
from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.ort import refusals, session, typed_feed
from onnx_udfc.methods.plus import absorb_constants, merge_routes
from onnx_udfc.moments.feeds import fixed_inputs


def batch_statistics(model: onnx.ModelProto, feed: dict[str, np.ndarray],
                     shapes: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN output name -> (batch mean, batch variance) of its input on ``feed`` (one batch)."""
    from onnx_udfc.moments.sampled import free_batch, training_batchnorm

    probe = free_batch(training_batchnorm(model, shapes))
    bns = [n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"]
    produced = {o for n in probe.graph.node for o in n.output}
    names = [name for o in bns for part in ("mu", "var")
             for name in [f"{o}__bnstat_{part}"] if name in produced]
    if not names:
        return {}
    values = _run_named(with_outputs(probe, names), names, feed)
    return {o: (values[f"{o}__bnstat_mu"].reshape(-1), values[f"{o}__bnstat_var"].reshape(-1))
            for o in bns if f"{o}__bnstat_mu" in values}


def frozen(model: onnx.ModelProto, original: onnx.ModelProto,
           stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` whose BNs use the original's batch statistics; a change the
    compression made to a BN mean (an absorbed constant) is kept as an offset."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _freeze(out, {t.name: t for t in original.graph.initializer}, stats)
    return out


def _freeze(model: onnx.ModelProto, orig: dict[str, onnx.TensorProto],
            stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """:func:`frozen` in place, ``orig`` the original's initializers by name."""
    if not stats:
        return
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        st = stats.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if st is None or node.input[3] not in inits or node.input[4] not in inits:
            continue
        mu_now = tensor_array(inits[node.input[3]]).astype(np.float64)
        mu_orig = tensor_array(orig[node.input[3]]).astype(np.float64) \
            if node.input[3] in orig else mu_now
        offset = mu_now - mu_orig if mu_orig.shape == mu_now.shape else 0.0
        dtype = tensor_array(inits[node.input[3]]).dtype
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(
            (st[0] + offset).astype(dtype), node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(
            st[1].astype(dtype), node.input[4]))


def needed_part(model: onnx.ModelProto, tensors: list[str],
                given: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A new model that computes ``tensors`` (its only outputs): the nodes they depend on, in
    ``model``'s order, and the initializers those read (copied). ``given`` tensors are inputs
    of the part instead of being computed; every graph input stays. On a deep network a probe
    then copies, serialises and runs a fraction of the weights and nodes."""
    graph, given = model.graph, given or {}
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    wanted, stack = set(), [t for t in tensors if t in producer and t not in given]
    while stack:
        i = producer[stack.pop()]
        if i in wanted:
            continue
        wanted.add(i)
        stack += [r for r in node_reads(graph.node[i]) if r in producer and r not in given]
    nodes = [graph.node[i] for i in sorted(wanted)]
    reads = {r for n in nodes for r in node_reads(n)} | set(tensors)
    part = onnx.ModelProto(ir_version=model.ir_version)
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = graph.name
    part.graph.node.extend(nodes)
    part.graph.initializer.extend(t for t in graph.initializer if t.name in reads)
    part.graph.sparse_initializer.extend(t for t in graph.sparse_initializer
                                         if t.values.name in reads)
    inits = {t.name for t in graph.initializer}
    part.graph.input.extend(i for i in graph.input if i.name not in inits or i.name in reads)
    part.graph.input.extend(onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), [None] * value.ndim)
        for name, value in given.items() if name in reads)
    part.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(tensors))
    return part


def run_tensors(model: onnx.ModelProto, feed: dict[str, np.ndarray], tensors: list[str],
                original: dict[str, onnx.TensorProto] | None = None,
                stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``tensors`` of ``model`` on ``feed`` (in one batch), computed by :func:`needed_part`
    from the inputs and the ``given`` tensors; with ``stats`` its BNs are frozen to them
    (:func:`frozen`, ``original``: the original's initializers by name)."""
    from onnx_udfc.moments.sampled import free_batch

    names = list(dict.fromkeys(tensors))
    probe = needed_part(model, names, given)
    _freeze(probe, original or {}, stats or {})
    free_batch(probe)
    used = {i.name for i in probe.graph.input}
    return _run_named(probe, names, {**feed, **{k: v for k, v in (given or {}).items()
                                                 if k in used}}, per_sample=True)


class CompressedRuns:
    """Runs of the compressed-so-far network on one feed that reuse what earlier runs
    computed. A tensor is reused while no node it depends on has changed since (a node
    changes with its inputs or the contents of the initializers it reads); the sequential fit
    changes the layers after the current one, so each run computes the few nodes between the
    last fitted layer and the tensors asked for, with the same inputs, weights and frozen
    BatchNorm statistics as a run from the graph inputs."""

    def __init__(self, model: onnx.ModelProto, feed: dict[str, np.ndarray],
                 original: dict[str, onnx.TensorProto],
                 stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.model, self.feed, self.original, self.stats = model, feed, original, stats
        self.cache: dict[str, tuple[np.ndarray, dict[int, tuple]]] = {}
        self._prints: dict[str, tuple[int, int]] = {}
        self._versions: dict[str, int] = {}

    def _signatures(self) -> Callable[[int], tuple]:
        """Node index -> its op, what it reads, and a version of each initializer it reads
        that goes up whenever the initializer's contents change. Computed on demand: the
        fingerprint reads an initializer's bytes, and a probe only compares the nodes above
        the tensors it reuses or computes."""
        graph = self.model.graph
        inits = {t.name: t for t in graph.initializer}
        versions: dict[str, int] = {}
        sigs: dict[int, tuple] = {}

        def version(name: str) -> int:
            if name not in versions:
                t = inits.get(name)
                if t is not None:
                    data = t.raw_data if t.HasField("raw_data") else t.SerializeToString()
                    mark = (len(data), zlib.crc32(data))
                    if self._prints.get(name) != mark:
                        self._prints[name] = mark
                        self._versions[name] = self._versions.get(name, 0) + 1
                versions[name] = self._versions.get(name, 0)
            return versions[name]

        def signature(i: int) -> tuple:
            if i not in sigs:
                reads = tuple(node_reads(graph.node[i]))
                sigs[i] = (graph.node[i].op_type, reads, tuple(version(r) for r in reads))
            return sigs[i]
        return signature

    def __call__(self, tensors: list[str]) -> dict[str, np.ndarray]:
        signature = self._signatures()
        given = {name: value for name, (value, upstream) in self.cache.items()
                 if name not in tensors
                 and all(signature(i) == sig for i, sig in upstream.items())}
        out = run_tensors(self.model, self.feed, tensors, self.original, self.stats, given)
        # keep what this run read and wrote: the next layer's probe starts from them (older
        # tensors would be recomputed from further up, never read stale)
        self.cache = {k: v for k, v in self.cache.items() if k in given}
        producer = {o: i for i, n in enumerate(self.model.graph.node) for o in n.output if o}
        for name, value in out.items():
            upstream, stack = {}, [name]
            while stack:
                i = producer.get(stack.pop())
                if i is not None and i not in upstream:
                    upstream[i] = signature(i)
                    stack += node_reads(self.model.graph.node[i])
            self.cache[name] = (value, upstream)
        return out


def _run_named(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray],
               per_sample: bool = False) -> dict[str, np.ndarray]:
    """The tensors ``names`` of ``model`` on ``feed``, in one batch (the BN batch statistics
    are those of the whole feed). ``per_sample``: a graph that bakes batch 1 into a constant
    (a Reshape to ``[1, -1]``) and refuses the batch is run one sample at a time, the results
    stacked; only right where no BatchNorm reads batch statistics (the probes of
    :func:`run_tensors` run every BN on fixed statistics)."""
    sess = session(model)
    typed = typed_feed(sess, feed)
    try:
        return dict(zip(names, sess.run(names, typed), strict=True))
    except refusals():
        fixed = fixed_inputs(model)
        count = next((len(v) for k, v in typed.items() if k not in fixed), 1)
        if not per_sample or count <= 1:
            raise
    runs = [sess.run(names, {k: v if k in fixed else v[i:i + 1] for k, v in typed.items()})
            for i in range(count)]
    return {name: np.concatenate([r[j] for r in runs]) for j, name in enumerate(names)}


def channels_last(a: np.ndarray, axis: int = 1) -> np.ndarray:
    """``a`` with its channels on ``axis`` (``[N, C, ...]`` by default; ``[N, T, C]`` token
    rows have them last) as float64 rows of C channels, transposed and widened in one copy."""
    return np.moveaxis(a, axis, -1).astype(np.float64, order="C").reshape(-1, a.shape[axis])


def fit(xt: np.ndarray, x: np.ndarray, kept: np.ndarray, targets: np.ndarray,
        prior: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``(B [|K|, |Z|], c [|Z|])`` with ``x[:, Z] ~ xt[:, K] B + c`` (ridge toward ``prior``)."""
    xk = xt[:, kept]
    mt, m = xk.mean(0), x[:, targets].mean(0)
    a = xk - mt
    ckk = a.T @ a / len(a)
    ckz = a.T @ (x[:, targets] - m) / len(a)
    d = float(np.mean(np.diag(ckk))) if kept.size else 0.0
    r = lam * d + 1e-12 * max(d, 1e-30)
    b = np.linalg.solve(ckk + r * np.eye(kept.size), ckz + r * prior)
    return b, m - mt @ b


def partitioned_fit(xt: np.ndarray, x: np.ndarray, kept: np.ndarray, targets: np.ndarray,
                    prior: np.ndarray, lam: float, labels: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit` within each set of channels that share a label (a grouped Conv absorber
    reads each group on its own, :func:`~onnx_udfc.channels.absorbers.channel_partition`);
    coefficients across labels are zero."""
    if np.all(labels == labels[0]):
        return fit(xt, x, kept, targets, prior, lam)
    b, c = np.zeros((kept.size, targets.size)), np.zeros(targets.size)
    for label in np.unique(labels[targets]):
        k, z = np.flatnonzero(labels[kept] == label), np.flatnonzero(labels[targets] == label)
        b[np.ix_(k, z)], c[z] = fit(xt, x, kept[k], targets[z], prior[np.ix_(k, z)], lam)
    return b, c


def fit_plans(ctx: ChannelAnalysis, found: list[Absorber], kept_cls: np.ndarray,
              target_cls: np.ndarray) -> list | None:
    """Per absorber the positions of the kept and target channels; None when an absorber does
    not read them all."""
    plans = []
    for ab in found:
        if not channels_present(ctx, ab.tensor, target_cls).all():
            return None
        pk = channel_positions(ctx, ab.tensor, kept_cls)
        pz = channel_positions(ctx, ab.tensor, target_cls)
        if pk is None or pz is None or pk.shape[1] != pz.shape[1]:
            return None
        plans.append((ab, pk, pz))
    return plans


def apply_fit(ctx: ChannelAnalysis, plans: list, b: np.ndarray) -> None:
    """``W'_K = sum_z W_z b_z^T`` in every absorber, the other target columns zeroed (they are
    removed next)."""
    for ab, pk, pz in plans:
        view = ColumnView(ctx, ab)
        for k in range(pk.shape[1]):
            cols = view.cols[pz[:, k]].copy()
            view.cols[pz[:, k]] = 0.0
            view.cols[pk[:, k]] = b @ cols
        view.write()
    return True


def sequential_pruning(ctx: ChannelAnalysis, removed: np.ndarray, todo: list[tuple[Any, list,
                       np.ndarray, np.ndarray, np.ndarray]], feed: dict[str, np.ndarray],
                       synthetic: bool, lam: float, const_scale: float, full: bool = True,
                       output_fit: bool = True, detail: Callable[[str], None] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Visit ``todo`` = [(producer, absorbers, classes, kept, pruned)] in order (see module
    docstring; the absorbers of one item share one route, see
    :func:`~onnx_udfc.channels.absorbers.routes`); with ``output_fit`` each plain Conv
    absorber is then refitted on patches (:mod:`onnx_udfc.methods.output_fit`). ``detail``
    receives a per-layer counter. Returns per producer name its report entry."""
    from onnx_udfc.methods.output_fit import output_target, refit_output

    original = onnx.ModelProto()
    original.CopyFrom(ctx.model)
    stats = batch_statistics(original, feed, ctx.shapes) if synthetic else {}
    tensors = [activation_tensor(p.node, ctx, found[0].crossed) for p, found, *_ in todo]
    # a route after a reader's BatchNorm reads a Concat: the producer's channels are a block
    positions = [producer_block(ctx, t, cls)
                 for (_p, _f, cls, *_), t in zip(todo, tensors, strict=True)]
    targets_of = []
    for (_p, found, cls, *_), t in zip(todo, tensors, strict=True):
        direct = output_fit and ctx.shapes.get(t, [0, -1])[1] == len(cls)
        targets_of.append([tg for ab in found if direct
                           for tg in [output_target(ctx, ab.layer.node, t)] if tg is not None])
    extra = [n for tgs in targets_of for tg in tgs
             for n in (tg.node.output[0], tg.shortcut) if n]
    orig_inits = {t.name: t for t in original.graph.initializer}
    reference = run_tensors(original, feed, tensors + extra, orig_inits, stats)
    compressed = CompressedRuns(ctx.model, feed, orig_inits, stats)
    out: dict[str, dict[str, Any]] = {}
    now: dict[str, np.ndarray] = {}
    for step, ((p, found, cls, kept, pruned), t, pos, tgs) in enumerate(
            zip(todo, tensors, positions, targets_of, strict=True)):
        if detail is not None:
            detail(f"fit layer {step + 1}/{len(todo)}")
        if step == 0 or todo[step - 1][0] is not p:
            # every route of a producer in one run: a route's fit changes only its own
            # absorbers, after every route tensor of the producer
            routes_here = [j for j in range(step, len(todo)) if todo[j][0] is p]
            now = compressed(list(dict.fromkeys(
                [tensors[j] for j in routes_here] +
                [tg.shortcut for j in routes_here for tg in targets_of[j] if tg.shortcut])))
        current = now[t]
        axis = channel_axes(ctx, [t]).get(t, 1)
        if (pos is None and current.shape[axis] != len(cls)) or \
                (pos is not None and pos.size != len(cls)):
            out[p.node.name or p.tensor] = {
                "compensated": False, "stats": "sequential",
                "reason": f"its channels are not one position each in '{t}'"}
            continue
        xt, x = channels_last(current, axis), channels_last(reference[t], axis)
        if pos is not None:
            xt, x = xt[:, pos], x[:, pos]
        targets = np.concatenate([kept, pruned])
        prior = np.zeros((kept.size, targets.size))
        prior[np.arange(kept.size), np.arange(kept.size)] = 1.0
        labels = channel_partition(ctx, found, cls)
        if full:
            b, c = partitioned_fit(xt, x, kept, targets, prior, lam, labels)
        else:
            bp, cp = partitioned_fit(xt, x, kept, pruned, prior[:, kept.size:], lam, labels)
            b, c = np.hstack([prior[:, :kept.size], bp]), np.concatenate([np.zeros(kept.size),
                                                                           cp])
        plans = fit_plans(ctx, found, cls[kept], cls[targets])
        ok = plans is not None
        missed = []
        if plans is not None:
            # constants first: they are folded with the columns as they are now
            missed = absorb_constants(ctx, found, cls[targets], const_scale * c)
            apply_fit(ctx, plans, b)
        refitted = []
        for tg in (tgs if ok else []):
            var = None
            if tg.batchnorm is not None:
                o = tg.batchnorm.output[0]
                var = stats[o][1].astype(np.float64) if o in stats else tensor_array(
                    ctx.inits[tg.batchnorm.input[4]]).astype(np.float64)
            if refit_output(ctx, original, tg, kept, current, reference[tg.node.output[0]],
                            now.get(tg.shortcut) if tg.shortcut else None,
                            reference.get(tg.shortcut) if tg.shortcut else None, var, lam):
                refitted.append(tg.node.name or tg.node.output[0])
        name = p.node.name or p.tensor
        resid = x[:, pruned] - (xt[:, kept] @ b[:, kept.size:] + c[kept.size:])
        var = x[:, pruned].var(0)
        rel = np.divide(resid.var(0), var, out=np.zeros_like(var), where=var > 0)
        entry: dict[str, Any] = {
            "compensated": ok, "stats": "sequential",
            "predicted_error": float(np.mean(np.sqrt(np.clip(rel, 0, None)))),
            "absorbers": [a.layer.node.name for a in found], "degenerate": []}
        if missed:
            entry["constant_skipped"] = missed
        if refitted:
            entry["output_refit"] = refitted
        if not ok:
            entry["reason"] = "an absorber reads only part of the channels"
        # a producer read around and through a depthwise Conv comes once per route
        out[name] = merge_routes([out[name], entry]) if name in out else entry
    return out
