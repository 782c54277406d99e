"""Graph-level glue between the channel analysis and the closed-form solver (:mod:`solve`).

For a layer L the *absorbers* are the weight layers that read L's output channels through ops
that keep each channel separate (activations, pooling, Flatten/Reshape, Concat, Split, Slice,
Pad, Transpose, ...). A reconstruction ``X_j ~ sum_i s_i X_i`` of a pruned channel, or a scale
``X_m ~ s~_m Xq_m`` of a quantized one, is folded into the absorbers' input columns (Eq. 8 and
Eq. 9). Where L's channels also reach something that mixes them differently (a residual Add, a
per-channel affine op, a graph output, a depthwise Conv for cross-channel sums) no absorber can
take the correction: the layer is reported "not compensated" with the reason and is pruned or
quantized plainly; udfc+ alone looks past a depthwise Conv, and past a BatchNormalization that
reads the channels among others (DenseNet's BN after a Concat), with
``through_channel_separate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnx_udfc.channels.activations import channel_separate, same_classes
from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.channels.stats import LayerWeights, follower_batchnorm, follower_bias, weight_layer
from onnx_udfc.core.io import set_tensor_array, tensor_array, tensor_dtype
from onnx_udfc.ops.base import attr
from onnx_udfc.ops.registry import Trait, op_spec

# Policy for activations that are not positively homogeneous but ReLU-like (GELU, SiLU,
# HardSwish, ReLU6, ELU, ...): fold the correction through them as an approximation (reported
# per layer as ``activations``), measured on the zoo with tools/bench_zoo.py. Saturating ones
# (Sigmoid, Tanh, ...) are never crossed; a quantization scale with a BatchNormalization right
# after the layer goes into that BN instead, which is exact for any activation.
PRUNE_THROUGH_CURVED = True
SCALE_THROUGH_CURVED = True


@dataclass
class Absorber:
    """A weight layer (or, for a quantization scale, the BN after the layer) reading ``tensor``
    whose input columns can take a correction.

    ``nonlinear`` names the ops between the layer and this absorber that are not positively
    homogeneous (GELU, SiLU = ``x * sigmoid(x)``, HardSwish, a Clip with an upper bound, ...):
    through them the correction is an approximation (see :func:`absorbers`). ``crossed``:
    the channel-separate layers the channels crossed to get here (depthwise Convs, a
    BatchNormalization after a Concat; ``through_channel_separate``)."""

    layer: LayerWeights
    tensor: str
    nonlinear: tuple[str, ...] = ()
    crossed: tuple[onnx.NodeProto, ...] = ()


def _uniform_constant(ctx: ChannelAnalysis, name: str, axis: int | None, rank: int | None
                      ) -> np.ndarray | None:
    """The value of a constant that is the same for every channel (scalar, or size 1 on the
    channel axis), else None."""
    value = ctx.const(name)
    if value is None:
        return None
    if value.ndim == 0 or value.size == 1:
        return value
    if axis is None or rank is None:
        return None
    ax = axis - (rank - value.ndim)
    return value if ax < 0 or (ax < value.ndim and value.shape[ax] == 1) else None


def absorbers(node: onnx.NodeProto, ctx: ChannelAnalysis, cross_channel: bool,
              through_channel_separate: bool = False) -> tuple[list[Absorber], str | None]:
    """The layers that read ``node``'s output channels, or the reason none can absorb.

    ``cross_channel``: the correction mixes channels (pruning), which a depthwise Conv cannot
    take; a per-channel scale (quantization) it can. ``through_channel_separate`` (udfc+): a
    depthwise Conv that keeps each channel on its own (:func:`.activations.channel_separate`),
    and a BatchNormalization with constant parameters that is not the layer's own (one that
    normalises a Concat of this layer's channels and others), are crossed to their
    absorbers, which record them in ``crossed``; absorbers reached by different routes
    (around a depthwise Conv and through it, through each of several BNs) each get the
    reconstruction of their own input, see :func:`routes`.

    Between the layer and its absorbers the channels may pass a following BatchNormalization or
    bias ``Add`` (part of the layer), channel-separate ops (pooling, layout, Concat/Split/...),
    and activations: single ops or elementwise patterns of the channel itself and
    channel-uniform constants (``x * sigmoid(x)`` = SiLU, ``x * hardsigmoid(x)``,
    ``0.5 x (1 + erf(x / sqrt 2))`` = GELU, ...). For a quantization scale the output may also
    be gated by a computed per-channel factor (squeeze-excite ``x * gate``): the scale is
    linear in x there, and the gate's own input is corrected too.

    Both corrections are derived for the pre-activation ``z`` of the layer. Through positively
    homogeneous ops (ReLU, LeakyReLU, PReLU, pooling, layout) they pass as in the paper. Through
    a ReLU-like curved activation (GELU, SiLU, HardSwish, ReLU6, ELU, ...) the same linear
    formula is an approximation, listed in each Absorber's ``nonlinear`` (policy:
    :data:`PRUNE_THROUGH_CURVED`, :data:`SCALE_THROUGH_CURVED`); a quantization scale then goes
    into the BatchNormalization right after the layer when there is one (``gamma *= s``:
    exact for any activation, and keeping the bias, see :func:`_scale_bn`). Saturating
    activations (Sigmoid, Tanh, HardSigmoid, ...) are not crossed: the reason names them.
    """
    outputs = {o.name for o in ctx.graph.output}
    bn = follower_batchnorm(node, ctx.consumers, outputs)
    added = follower_bias(node, ctx.consumers, ctx.inits, outputs)
    found: list[Absorber] = []
    path: dict[str, tuple[str, ...]] = {node.output[0]: ()}  # reached tensor -> nonlinear ops
    root: dict[str, str] = {node.output[0]: node.output[0]}  # elementwise source of a tensor
    bounded: dict[str, str] = {}  # reached tensor -> the saturating op it is an output of
    stack, seen, pending = [node.output[0]], set(), []
    saturated: list[str] = []  # saturating ops in front of an absorber

    def reach(name: str, via: tuple[str, ...], src: str, sat: str = "") -> None:
        if name and name not in path:
            path[name], root[name] = via, src
            if sat:
                bounded[name] = sat
            stack.append(name)

    def binary(c: onnx.NodeProto) -> str | None:
        """'ok' when ``c`` is part of an activation of one reached tensor, 'wait' when an input
        is not reached yet, else a reason."""
        out = c.output[0]
        info = ctx.tensors.get(out)
        axis, rank = (info.axis if info else None), ctx.rank(out)
        srcs, consts, reached = set(), [], []
        for n in c.input:
            if not n:
                continue
            if n in root:
                srcs.add(root[n])
                reached.append(n)
            elif (v := _uniform_constant(ctx, n, axis, rank)) is not None:
                consts.append(v)
            elif ctx.const(n) is not None:
                return f"its channels feed {_label(c)} with a per-channel constant"
            else:
                return "wait"
        if len(srcs) != 1:
            return f"its channels feed {_label(c)}"
        homogeneous = (c.op_type in ("Mul", "Div") and len(reached) == 1
                       and (c.op_type == "Mul" or c.input[0] in root)) or \
            (c.op_type in ("Add", "Sub", "Max") and all(not np.any(v) for v in consts))
        via = tuple(dict.fromkeys(sum((path[n] for n in reached), ()) +
                                  (() if homogeneous else (c.op_type,))))
        # x * g(x) is gated by the channel itself: ReLU-like again, unless every factor is
        # bounded; with constants only, the boundedness of the single input carries over.
        sat = [bounded.get(n, "") for n in reached]
        gated = c.op_type == "Mul" and len(reached) > 1
        reach(out, via, srcs.pop(), "" if gated and not all(sat) else next(
            (x for x in sat if x), ""))
        return "ok"

    while True:
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in outputs:
                return [], f"its channels reach graph output '{t}'"
            for c in ctx.consumers.get(t, []):
                label = _label(c)
                if c is bn or (bn is not None and c.output[0] == bn.output[0]) or \
                        (added is not None and c is added[0]):
                    reach(c.output[0], path[t], c.output[0])
                    continue
                if through_channel_separate and cross_channel and \
                        c.op_type == "BatchNormalization" and c.input[0] == t:
                    after, reason = _through_batchnorm(c, ctx)
                    if reason is not None:
                        return [], reason
                    found.extend(after)
                    continue
                spec = op_spec(c.op_type)
                if Trait.BINARY in spec.traits:
                    verdict = binary(c)
                    if verdict == "wait":
                        pending.append(c)
                    elif verdict != "ok":
                        return [], verdict
                    continue
                if c.input[0] != t and c.op_type != "Concat":
                    return [], f"its channels enter {label} as a parameter"
                layer = weight_layer(c, ctx.inits)
                if layer is not None:  # (a ConvTranspose has a layout only when not grouped)
                    groups = int(attr(c, "group", 1))
                    depthwise = groups == _channels(c, ctx) and \
                        int(ctx.inits[c.input[1]].dims[0]) == groups
                    if through_channel_separate and cross_channel and depthwise:
                        after, reason = _through_depthwise(c, t, node.output[0], ctx)
                        if reason is not None:
                            return [], reason
                        found.extend(after)
                        continue
                    if t in bounded:
                        saturated.append(bounded[t])
                    if groups == 1 or (not cross_channel and depthwise):
                        if c.op_type == "Conv" and groups > 1:
                            layer = LayerWeights(c, c.input[1], 0, 0)
                        found.append(Absorber(layer, t, path[t]))
                        continue
                    if through_channel_separate and c.op_type == "Conv" and \
                            int(ctx.inits[c.input[1]].dims[1]) > 1:
                        # a grouped Conv takes a reconstruction from its own group's channels
                        # (see channel_partition)
                        found.append(Absorber(layer, t, path[t]))
                        continue
                    return [], f"its channels pass through grouped/depthwise {label}"
                if Trait.TRANSPARENT in spec.traits:
                    lost = [o for o in c.output if o and (o in outputs or ctx.consumers.get(o))
                            and (ctx.tensors.get(o) is None or ctx.tensors[o].slots is None)]
                    if lost:  # e.g. a channel shuffle: the positions after it are unknown
                        return [], f"its channels pass through {label}, which the analysis " \
                            "cannot follow"
                    elementwise = Trait.UNARY in spec.traits
                    via = path[t] if spec.homogeneous(c, ctx.const) else \
                        tuple(dict.fromkeys(path[t] + (c.op_type,)))
                    sat = c.op_type if Trait.SATURATING in spec.traits else bounded.get(t, "")
                    for o in c.output:
                        reach(o, via, root[t] if elementwise else o, sat)
                    continue
                return [], f"its channels feed {label}"
        progress = False
        for c in list(pending):
            if c.output[0] in path:
                pending.remove(c)
                continue
            verdict = binary(c)
            if verdict == "ok":
                pending.remove(c)
                progress = True
            elif verdict != "wait":
                return [], verdict
        if not progress and pending and not cross_channel:
            c = pending[0]  # squeeze-excite: x * gate, linear in x for a per-channel scale
            gate = [n for n in c.input if n and n not in root]
            if c.op_type == "Mul" and len(gate) == 1 and same_classes(ctx, gate[0], c.output[0]):
                x = next(n for n in c.input if n in root)
                pending.remove(c)
                reach(c.output[0], path[x], c.output[0], bounded.get(x, ""))
                progress = True
        if not progress:
            break
    if pending:
        return [], f"its channels feed {_label(pending[0])}"
    if not found:
        return [], "no layer reads its channels"
    curved = sorted({op for a in found for op in a.nonlinear})
    if curved and not cross_channel and bn is not None:
        into_bn = _batchnorm_absorbers(bn, node, ctx)
        if into_bn:
            return into_bn, None
    if saturated:
        return [], f"its channels pass through {saturated[0]}, a saturating activation"
    policy = PRUNE_THROUGH_CURVED if cross_channel else SCALE_THROUGH_CURVED
    if curved and not policy:
        what = "reconstruction" if cross_channel else "scale"
        return [], (f"the {what} would pass through an activation that is not positively "
                    f"homogeneous ({', '.join(curved)})")
    return found, None


def routes(found: list[Absorber]) -> list[tuple[tuple[onnx.NodeProto, ...], list[Absorber]]]:
    """``found`` grouped by the channel-separate layers crossed to reach them, in order of
    first appearance: one reconstruction per group, fitted where its absorbers read."""
    out: dict[tuple[str, ...], tuple[tuple[onnx.NodeProto, ...], list[Absorber]]] = {}
    for a in found:
        key = tuple(n.output[0] for n in a.crossed)
        out.setdefault(key, (a.crossed, []))[1].append(a)
    return list(out.values())


def _through_depthwise(conv: onnx.NodeProto, t: str, origin: str, ctx: ChannelAnalysis
                       ) -> tuple[list[Absorber], str | None]:
    """The absorbers of a depthwise ``conv``'s channels (``origin``'s, read from ``t``),
    ``conv`` recorded as crossed; or why the reconstruction cannot move past it."""
    reason = channel_separate(conv, t, origin, ctx)
    if reason is not None:
        return [], reason
    found, reason = absorbers(conv, ctx, True, through_channel_separate=True)
    if reason is not None:
        return [], f"{reason} (after depthwise {_label(conv)})"
    return [replace(a, crossed=(conv, *a.crossed)) for a in found], None


def _through_batchnorm(bn: onnx.NodeProto, ctx: ChannelAnalysis
                       ) -> tuple[list[Absorber], str | None]:
    """The absorbers after a BatchNormalization that reads the channels (among others, after
    a Concat), ``bn`` recorded as crossed; or why the reconstruction cannot move past it. Each
    reader BN scales and shifts the channels its own way, so its absorbers get a
    reconstruction fitted after it (and its activation), from the same producer's kept
    channels there."""
    if any(ctx.const(n) is None for n in bn.input[1:5]):
        return [], f"its channels feed {_label(bn)} with parameters computed at run time"
    found, reason = absorbers(bn, ctx, True, through_channel_separate=True)
    if reason is not None:
        return [], f"{reason} (after {_label(bn)})"
    return [replace(a, crossed=(bn, *a.crossed)) for a in found], None


def _batchnorm_absorbers(bn: onnx.NodeProto, node: onnx.NodeProto, ctx: ChannelAnalysis
                         ) -> list[Absorber]:
    """The BN after ``node`` as the absorber of a per-channel scale (see :func:`_scale_bn`)."""
    uses = weight_uses(ctx.graph)
    if len(bn.input) < 5 or any(n not in ctx.inits or uses.get(n, 0) != 1
                                for n in bn.input[1:5]):
        return []
    return [Absorber(LayerWeights(bn, bn.input[1], 0, 0), node.output[0])]


def _scale_bn(ctx: ChannelAnalysis, bn: onnx.NodeProto, positions: np.ndarray,
              scales: np.ndarray) -> None:
    """Rescale the weight part of the pre-activation, ``z = s (gamma/sigma) Wq x + K``, keeping
    the folded bias K: ``gamma' = s gamma`` and ``beta' = beta - (s - 1) gamma (b - mean) /
    sigma`` (b: the layer's own bias, absorbed into ``mean`` like everywhere else). What the
    activation sees is then what Eq. 21 fitted, for any activation."""
    producer = next(n for n in ctx.graph.node if bn.input[0] in n.output)
    layer = weight_layer(producer, ctx.inits)
    bias = layer.bias(ctx.inits) if layer is not None else None
    gamma, beta, mean, var = (tensor_array(ctx.inits[n]).astype(np.float64)
                              for n in bn.input[1:5])
    eps = float(attr(bn, "epsilon", 1e-5))
    idx = positions[:, 0]
    shift = mean - (bias if bias is not None else 0.0)
    new_gamma, new_beta = gamma.copy(), beta.copy()
    new_gamma[idx] = scales * gamma[idx]
    new_beta[idx] = beta[idx] + (scales - 1.0) * gamma[idx] * shift[idx] / np.sqrt(var[idx] + eps)
    for name, value in ((bn.input[1], new_gamma), (bn.input[2], new_beta)):
        init = ctx.inits[name]
        set_tensor_array(init, value.astype(tensor_dtype(init)))


def _label(c: onnx.NodeProto) -> str:
    return f"{c.op_type} '{c.name or c.output[0]}'"


def _channels(node: onnx.NodeProto, ctx: ChannelAnalysis) -> int:
    w = ctx.inits[node.input[1]]
    return int(w.dims[1]) * int(attr(node, "group", 1))


def channel_positions(ctx: ChannelAnalysis, tensor: str, classes: np.ndarray) -> np.ndarray | None:
    """``[len(classes), m]`` positions of each class along ``tensor``'s channel axis (each
    channel may occupy m positions, e.g. a Flatten block). None if a class is missing or the
    blocks are uneven."""
    info = ctx.tensors.get(tensor)
    if info is None or info.slots is None:
        return None
    roots = ctx.roots()[info.slots]
    if len(classes) == 0:
        return None
    # One sort instead of a scan of the tensor per class (a 2048-channel layer asked 2048
    # times): a stable sort keeps each class's positions in ascending order, as a scan finds
    # them.
    order = np.argsort(roots, kind="stable")
    ranked = roots[order]
    first = np.searchsorted(ranked, classes, "left")
    count = np.searchsorted(ranked, classes, "right") - first
    if count[0] == 0 or (count != count[0]).any():
        return None
    return order[first[:, None] + np.arange(count[0])]


def producer_block(ctx: ChannelAnalysis, tensor: str, classes: np.ndarray
                   ) -> np.ndarray | None:
    """Where ``classes`` (a producer's channels, in its order) sit along ``tensor``'s channel
    axis, when the tensor also holds other layers' channels (a reader's BatchNorm after a
    Concat); None when it holds the producer's alone, in order, or its layout is unknown (the
    whole tensor is the producer's). An empty array when they are not there one position
    each."""
    info = ctx.tensors.get(tensor)
    if info is None or info.slots is None or np.array_equal(ctx.roots()[info.slots], classes):
        return None
    pos = channel_positions(ctx, tensor, classes)
    return pos[:, 0] if pos is not None and pos.shape[1] == 1 else np.zeros(0, dtype=np.int64)


def channels_present(ctx: ChannelAnalysis, tensor: str, classes: np.ndarray) -> np.ndarray:
    """Which of ``classes`` the tensor holds (a Split/Slice reader sees a subset)."""
    info = ctx.tensors.get(tensor)
    if info is None or info.slots is None:
        return np.zeros(len(classes), dtype=bool)
    return np.isin(classes, ctx.roots()[info.slots])


def conv_groups(absorber: Absorber) -> int:
    """The groups of a grouped Conv absorber that mixes the channels of each group (1 for any
    other layer, and for a depthwise Conv taking a per-channel scale)."""
    node = absorber.layer.node
    if node.op_type != "Conv" or absorber.layer.in_axis != 1:
        return 1
    return int(attr(node, "group", 1))


def channel_partition(ctx: ChannelAnalysis, found: list[Absorber], classes: np.ndarray
                      ) -> np.ndarray:
    """A label per channel of ``classes``: channels that share a label are read by the same
    group of every grouped Conv absorber, so a reconstruction from one label's kept channels
    stays inside each group (all labels equal when no absorber is grouped)."""
    keys = np.zeros((len(classes), 0), dtype=np.int64)
    for ab in found:
        groups = conv_groups(ab)
        if groups == 1:
            continue
        per_group = int(ctx.inits[ab.layer.weight].dims[1])
        group_of = np.full(len(classes), -1, dtype=np.int64)
        here = channels_present(ctx, ab.tensor, classes)
        pos = channel_positions(ctx, ab.tensor, classes[here]) if here.any() else None
        if pos is not None:
            group_of[here] = pos[:, 0] // per_group
        keys = np.column_stack([keys, group_of])
    if keys.shape[1] == 0:
        return np.zeros(len(classes), dtype=np.int64)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


class ColumnView:
    """An absorber's weight as ``[input positions, rest]`` in float64, written back on exit.
    A grouped Conv is viewed as the dense Conv it equals (zero weights between groups), so a
    correction within each group is a column update like any other."""

    def __init__(self, ctx: ChannelAnalysis, absorber: Absorber) -> None:
        self.init = ctx.inits[absorber.layer.weight]
        w = tensor_array(self.init)
        self.dtype, self.shape = w.dtype, w.shape
        self.axis = absorber.layer.in_axis
        self.groups = conv_groups(absorber)
        moved = np.moveaxis(w.astype(np.float64), self.axis, 0)
        if self.groups > 1:  # [C/g, O, k...] -> block-diagonal [C, O, k...]
            per_group, out_per_group = moved.shape[0], moved.shape[1] // self.groups
            dense = np.zeros((per_group * self.groups, *moved.shape[1:]))
            for g in range(self.groups):
                outs = slice(g * out_per_group, (g + 1) * out_per_group)
                dense[g * per_group:(g + 1) * per_group, outs] = moved[:, outs]
            moved = dense
        self.moved_shape = moved.shape
        self.cols = moved.reshape(moved.shape[0], -1).copy()

    @property
    def by_output(self) -> np.ndarray:
        """The weight as ``[input positions, output channels, taps]`` (a view of ``cols``)."""
        return self.cols.reshape(self.moved_shape[0], self.moved_shape[1], -1)

    def write(self) -> None:
        moved = self.cols.reshape(self.moved_shape)
        if self.groups > 1:
            per_group = moved.shape[0] // self.groups
            out_per_group = moved.shape[1] // self.groups
            moved = np.concatenate([moved[g * per_group:(g + 1) * per_group,
                                          g * out_per_group:(g + 1) * out_per_group]
                                    for g in range(self.groups)], axis=1)
        w = np.moveaxis(moved, 0, self.axis)
        set_tensor_array(self.init, w.astype(self.dtype))


def apply_reconstruction(ctx: ChannelAnalysis, found: list[Absorber], kept_cls: np.ndarray,
                         pruned_cls: np.ndarray, coefficients: np.ndarray) -> list[str]:
    """Eq. 8 in every absorber: ``W'[:, i] += sum_j s_ji W'[:, j]`` (per block position).

    An absorber that reads none of the pruned channels needs nothing; one that reads a pruned
    channel must read every kept channel its reconstruction uses. All or nothing: when an
    absorber cannot be updated, none is, and the names of those that could not are returned.
    """
    plans, skipped = [], []
    for ab in found:
        has_p = channels_present(ctx, ab.tensor, pruned_cls)
        if not has_p.any():
            continue
        used = np.any(coefficients[has_p] != 0, axis=0)
        has_k = channels_present(ctx, ab.tensor, kept_cls)
        pk = channel_positions(ctx, ab.tensor, kept_cls[has_k]) if has_k.any() else None
        pp = channel_positions(ctx, ab.tensor, pruned_cls[has_p])
        if pp is None or (used & ~has_k).any() or (pk is not None and
                                                   pk.shape[1] != pp.shape[1]):
            skipped.append(ab.layer.node.name)
            continue
        plans.append((ab, pk, pp, coefficients[has_p][:, has_k]))
    if skipped:
        return skipped
    for ab, pk, pp, coef in plans:
        if pk is None:
            continue  # no kept channel here: the pruned ones are simply dropped
        view = ColumnView(ctx, ab)
        for k in range(pk.shape[1]):
            view.cols[pk[:, k]] += coef.T @ view.cols[pp[:, k]]
        view.write()
    return []


def apply_scales(ctx: ChannelAnalysis, found: list[Absorber], classes: np.ndarray,
                 scales: np.ndarray) -> list[str]:
    """Eq. 9 in every absorber: ``W'[:, m] *= s~_m`` on every position of channel m it reads
    (a reader of a Split/Slice takes its subset). All or nothing, like
    :func:`apply_reconstruction`."""
    plans, skipped = [], []
    for ab in found:
        here = channels_present(ctx, ab.tensor, classes)
        pos = channel_positions(ctx, ab.tensor, classes[here]) if here.any() else None
        if pos is None:
            skipped.append(ab.layer.node.name)
            continue
        plans.append((ab, pos, scales[here]))
    if skipped:
        return skipped
    for ab, pos, sc in plans:
        if ab.layer.node.op_type == "BatchNormalization":
            _scale_bn(ctx, ab.layer.node, pos, sc)
            continue
        _scale_inputs(ctx, ab, pos, sc)
    return []


def _scale_inputs(ctx: ChannelAnalysis, absorber: Absorber, positions: np.ndarray,
                  scales: np.ndarray) -> None:
    """``W[:, p] *= s`` at every input position ``p`` of row i of ``positions`` (``[n, m]``)
    with ``scales[i]``, in float64 like a :class:`ColumnView` (the same bits), in the weight's
    own layout: no transposed copies. Other positions are multiplied by 1.0, which keeps
    their bits; a grouped Conv's position is read by its own group's outputs only."""
    init = ctx.inits[absorber.layer.weight]
    w = tensor_array(init)
    axis, groups = absorber.layer.in_axis, conv_groups(absorber)
    factor = np.ones(w.shape[axis] * groups)
    factor[positions] = scales[:, None]
    if groups > 1:  # [O, C/g, k...]: output o reads positions (o // (O/g)) * C/g + [0, C/g)
        per_output = np.repeat(factor.reshape(groups, w.shape[1]), w.shape[0] // groups, axis=0)
        factor = per_output.reshape(*per_output.shape, *[1] * (w.ndim - 2))
    else:
        factor = factor.reshape([-1 if a == axis else 1 for a in range(w.ndim)])
    # float64(w) * factor rounded to w's dtype, as astype(float64), *= and astype(dtype) give,
    # in one pass: the ufunc computes in float64 (its inputs' common type) and casts each
    # buffered block to ``out``'s dtype.
    scaled = np.empty(w.shape, dtype=w.dtype)
    np.multiply(w, factor, out=scaled, casting="same_kind")
    set_tensor_array(init, scaled)


def weight_uses(graph: onnx.GraphProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses
