"""Channel-group analysis: which channels of an ONNX graph must be removed together.

Every channel of every activation tensor is a *slot*. Rules (one per op type, in
:mod:`onnx_udfc.ops.base`) either let an output reuse its input's slots (pass-through, with any
index map: concat offsets, pads, slices, flatten blocks) or declare fresh slots (a Conv's output
filters), and tie slots together where an op couples channels (a residual Add). After all rules
ran, a union-find over slots gives the *channel classes*: a class is removed as a whole, from
every tensor that holds one of its slots. Classes that share a tensor form a *group*, the unit a
pruning ratio applies to.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_udfc.core.io import Shape, tensor_array
from onnx_udfc.ops.base import SOURCE_FILTER, SOURCE_ZERO, UnknownRank  # noqa: F401  (re-exported)


@dataclass
class TensorChannels:
    """Where a tensor's channels live: its channel axis and one slot id per channel.

    ``slots is None`` marks an opaque tensor (a graph input, the output of an unsupported op):
    any rule that needs its channels gets fixed slots for them.
    """

    axis: int | None
    slots: np.ndarray | None
    opaque_reason: str = ""


@dataclass
class Producer:
    """A node whose output channels are fresh slots (a Conv's filters)."""

    node: onnx.NodeProto
    tensor: str
    slots: np.ndarray
    # per output channel, for the l1/l2 criterion; norms rather than the filters themselves,
    # so the analysis holds no second copy of the weights (None: analysed without norms)
    l1: np.ndarray | None
    l2: np.ndarray | None


@dataclass
class ChannelGroup:
    """Channel classes that share tensors; the unit a pruning ratio is applied to."""

    id: int
    classes: np.ndarray  # class ids (slot roots), in order of first appearance
    tensors: list[str]
    producers: list[str]  # node names
    consumers: list[str]  # node names that read a tensor of the group
    fixed: dict[int, str] = field(default_factory=dict)  # class id -> reason
    coupled: bool = False
    blocks: np.ndarray | None = None  # class -> block index for group-balanced removal
    # class -> index of its producer, when an uncoupled group joins channels of several layers
    # (the inputs of a Concat): each layer gives up its share, as uniform pruning means
    parts: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> int:
        return self.size - len(self.fixed)

    def reasons(self) -> list[str]:
        return [f"{n}x {r}" if n > 1 else r
                for r, n in Counter(self.fixed.values()).most_common()]


class ChannelAnalysis:
    """The channel analysis of one (normalised) model; rules call the methods below."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape],
                 norms: bool = True) -> None:
        self.model = model
        self.norms = norms  # the producers' filter norms (the pruning criteria read them)
        self.graph = model.graph
        self.shapes = shapes
        self.inits = {t.name: t for t in self.graph.initializer}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          0)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.tensors: dict[str, TensorChannels] = {}
        self.producers: list[Producer] = []
        self.balance: list[tuple[np.ndarray, int]] = []
        self._parent: list[int] = []
        self._roots: np.ndarray | None = None  # roots() until _parent changes
        self._source: list[int] = []
        self._fixed: dict[int, str] = {}
        self._opaque_cache: dict[tuple[str, int], np.ndarray] = {}
        self.unsupported: list[tuple[str, str]] = []  # (node name, reason)
        self.untouchable: set[str] = set()  # first outputs of nodes the rewrite must not edit

    # -- values and shapes -------------------------------------------------------------------
    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None for a computed tensor."""
        t = self.inits.get(name) if name else None
        return None if t is None else tensor_array(t)

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)

    def is_activation(self, name: str) -> bool:
        return bool(name) and name not in self.inits and name in self.tensors

    # -- slots -------------------------------------------------------------------------------
    def new_slots(self, count: int, source: int = 0) -> np.ndarray:
        start = len(self._parent)
        self._roots = None
        self._parent.extend(range(start, start + count))
        self._source.extend([source] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def fix(self, slots: np.ndarray | None, reason: str) -> None:
        if slots is None:
            return
        for s in slots.tolist():
            self._fixed.setdefault(s, reason)

    def _find(self, x: int) -> int:
        parent = self._parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie slot a[k] to b[k] for every k (the channels must be removed together)."""
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)
                self._roots = None

    def set(self, name: str, axis: int | None, slots: np.ndarray | None,
            opaque_reason: str = "") -> None:
        self.tensors[name] = TensorChannels(axis, slots, opaque_reason)

    def channels(self, name: str) -> TensorChannels | None:
        return self.tensors.get(name) if name and name not in self.inits else None

    def slots(self, name: str, axis: int) -> np.ndarray:
        """The slots of ``name`` along ``axis`` as a consumer sees them.

        An opaque tensor, or one whose channels sit on another axis than the consumer's, yields
        fixed slots: the consumer's channels cannot be traced to a prunable source.
        """
        info = self.tensors.get(name)
        if info is not None and info.slots is not None and info.axis == axis:
            return info.slots
        key = (name, axis)
        if key not in self._opaque_cache:
            shape = self.shape(name)
            size = shape[axis] if shape is not None and axis < len(shape) else None
            if not isinstance(size, int):
                size = 0
            fresh = self.new_slots(size)
            if info is not None and info.slots is not None:
                self.fix(info.slots, f"channel axis of '{name}' is read as axis {axis}")
                reason = f"channel axis of '{name}' is read as axis {axis}"
            else:
                reason = info.opaque_reason if info is not None and info.opaque_reason \
                    else f"'{name}' has no traceable channel source"
            self.fix(fresh, reason)
            self._opaque_cache[key] = fresh
        return self._opaque_cache[key]

    def fix_tensor(self, name: str, reason: str) -> None:
        info = self.tensors.get(name)
        if info is not None:
            self.fix(info.slots, reason)

    def produce(self, node: onnx.NodeProto, tensor: str, axis: int,
                filters: np.ndarray) -> np.ndarray:
        slots = self.new_slots(filters.shape[0], SOURCE_FILTER)
        l1, l2 = filter_norms(filters) if self.norms else (None, None)
        self.producers.append(Producer(node, tensor, slots, l1, l2))
        self.set(tensor, axis, slots)
        return slots

    # -- results -----------------------------------------------------------------------------
    def roots(self) -> np.ndarray:
        """Each slot's class (read-only; kept until a slot is added or two are tied)."""
        if self._roots is None:
            parent = np.asarray(self._parent, dtype=np.int64)
            while True:
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
            parent.flags.writeable = False
            self._roots = parent
        return self._roots

    def groups(self) -> list[ChannelGroup]:
        """The channel groups, each with its fixed classes and why."""
        root = self.roots()
        n = len(root)
        # Second union-find: classes sharing a tensor belong to one group.
        gparent = list(range(n))  # a list: indexing a NumPy array per element is 3x slower

        def gfind(x: int) -> int:
            while gparent[x] != x:
                gparent[x] = gparent[gparent[x]]
                x = gparent[x]
            return x

        tensor_roots: dict[str, np.ndarray] = {}
        for name, info in self.tensors.items():
            if info.slots is None or len(info.slots) == 0:
                continue
            r = np.unique(root[info.slots])
            tensor_roots[name] = r
            first = gfind(int(r[0]))
            for x in r[1:].tolist():
                fx = gfind(x)
                if fx != first:
                    gparent[max(fx, first)] = min(fx, first)
                    first = min(fx, first)
        members: dict[int, list[int]] = defaultdict(list)
        seen = set()
        for r in tensor_roots.values():
            for x in r.tolist():
                if x not in seen:
                    seen.add(x)
                    members[gfind(x)].append(x)
        fixed_class: dict[int, str] = {}
        for s, reason in self._fixed.items():
            fixed_class.setdefault(int(root[s]), reason)
        sources = np.zeros(n, dtype=np.int64)
        src = np.asarray(self._source, dtype=np.int64)
        np.add.at(sources, root[src > 0], 1)
        by_group_tensors: dict[int, list[str]] = defaultdict(list)
        for name, r in tensor_roots.items():
            by_group_tensors[gfind(int(r[0]))].append(name)
        producer_of = defaultdict(list)
        made_by: dict[int, set[int]] = defaultdict(set)
        for index, p in enumerate(self.producers):
            if len(p.slots):
                producer_of[gfind(int(root[p.slots[0]]))].append(p.node.name or p.tensor)
            for c in root[p.slots].tolist():
                made_by[c].add(index)
        groups = []
        for gid, (key, cls) in enumerate(sorted(members.items(), key=lambda kv: kv[1][0])):
            classes = np.asarray(sorted(cls), dtype=np.int64)
            tensors = by_group_tensors[key]
            consumers = sorted({c.name or c.op_type for t in tensors
                                for c in self.consumers.get(t, [])})
            group = ChannelGroup(gid, classes, tensors, producer_of[key], consumers)
            group.fixed = {c: fixed_class[c] for c in classes.tolist() if c in fixed_class}
            group.coupled = bool((sources[classes] > 1).any())
            # residual classes (several producers each) keep one ranking: their summed scores
            # already weigh every layer that writes them
            group.parts = None if group.coupled else _producer_parts(classes, made_by)
            groups.append(group)
        self._attach_blocks(groups, root)
        return groups

    def _attach_blocks(self, groups: list[ChannelGroup], root: np.ndarray) -> None:
        """Grouped convolutions need the same number of channels removed from each conv group."""
        class_group = {c: g for g in groups for c in g.classes.tolist()}
        for slots, ngroups in self.balance:
            if len(slots) == 0:
                continue
            classes = root[slots]
            group = class_group.get(int(classes[0]))
            if group is None:
                continue
            block_of = np.repeat(np.arange(ngroups), len(slots) // ngroups)
            mapping = dict(zip(classes.tolist(), block_of.tolist(), strict=True))
            if group.blocks is None:
                group.blocks = np.full(group.size, -1, dtype=np.int64)
            index = {c: i for i, c in enumerate(group.classes.tolist())}
            conflict = False
            for c, b in mapping.items():
                i = index[c]
                if group.blocks[i] not in (-1, b):
                    conflict = True
                group.blocks[i] = b
            if conflict or len(set(np.bincount(block_of).tolist())) != 1:
                for c in group.classes.tolist():
                    group.fixed.setdefault(c, "conflicting grouped-Conv partitions")

    def class_scores(self, criterion: str = "l1") -> np.ndarray:
        """Per class, the l1 or l2 norm of its producers' filters, summed over coupled sources."""
        root = self.roots()
        scores = np.zeros(len(root), dtype=np.float64)
        for p in self.producers:
            np.add.at(scores, root[p.slots], p.l1 if criterion == "l1" else p.l2)
        return scores

    def node_classes(self, pattern: str) -> set[int]:
        """Classes touched by nodes whose name matches ``pattern`` (for --exclude)."""
        rx = re.compile(pattern)
        root = self.roots()
        out: set[int] = set()
        for node in self.graph.node:
            if rx.search(node.name or ""):
                for name in list(node.input) + list(node.output):
                    info = self.tensors.get(name)
                    if info is not None and info.slots is not None:
                        out.update(root[info.slots].tolist())
        return out


def _producer_parts(classes: np.ndarray, made_by: dict[int, set[int]]) -> np.ndarray | None:
    """Per class, an index of the set of producers that make it; None for a single set."""
    keys = [tuple(sorted(made_by.get(c, ()))) for c in classes.tolist()]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return None if len(index) < 2 else np.asarray([index[k] for k in keys], dtype=np.int64)


def filter_norms(filters: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise l1 and l2 norms in float64, a block of rows at a time: a 1 GiB weight must not
    be copied whole to float64, and blocks of 512 KiB keep the float64 copy and its
    temporaries in cache (3x faster than blocks of 32 MiB). Every row is summed alone, so the
    block size changes no bit of the norms."""
    f = filters.reshape(filters.shape[0], -1)
    rows = max(1, chunk // max(1, f.shape[1]))
    l1, l2 = np.empty(f.shape[0]), np.empty(f.shape[0])
    for start in range(0, f.shape[0], rows):
        block = f[start:start + rows].astype(np.float64)
        l1[start:start + rows] = np.abs(block).sum(axis=1)
        l2[start:start + rows] = np.sqrt((block * block).sum(axis=1))
    return l1, l2


def analyse(model: onnx.ModelProto, shapes: dict[str, Shape], norms: bool = True
            ) -> ChannelAnalysis:
    """Run every node's channel rule in graph order (the graph must be topologically sorted);
    ``norms=False`` leaves the producers' filter norms out (nothing is pruned from it)."""
    from onnx_udfc.ops.base import unsupported
    from onnx_udfc.ops.registry import op_spec

    ctx = ChannelAnalysis(model, shapes, norms)
    for inp in model.graph.input:
        if inp.name not in ctx.inits:
            ctx.set(inp.name, None, None, f"graph input '{inp.name}'")
    for node in model.graph.node:
        outer = _outer_reads(node)  # names its If/Loop/Scan bodies read from this graph
        ins = [n for n in [*node.input, *sorted(outer)] if n and n in ctx.tensors]
        if not ins:
            continue  # pure constant or shape arithmetic: no channels involved
        rule = op_spec(node.op_type).rule if node.domain in ("", "ai.onnx") else None
        try:
            reason = f"unsupported op {node.op_type}" if rule is None or outer \
                else rule.analyse(node, ctx)
        except UnknownRank as exc:  # the node is left alone, like any other it cannot follow
            reason = str(exc)
        if reason:
            unsupported(node, ctx, reason)
            for name in outer:  # read implicitly, so unsupported() does not see them
                ctx.fix_tensor(name, f"{reason} at '{node.name or node.output[0]}'")
    for out in model.graph.output:
        ctx.fix_tensor(out.name, f"reaches graph output '{out.name}'")
    return ctx


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names that the subgraphs of a node (If, Loop, Scan) read from the enclosing scopes."""
    names: set[str] = set()
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer} \
                | {o for n in sub.node for o in n.output}
            for n in sub.node:
                names.update(i for i in [*n.input, *_outer_reads(n)] if i and i not in local)
    return names
