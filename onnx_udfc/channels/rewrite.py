"""Apply a pruning plan to the graph: every rule rewrites its node for the kept channels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.core.io import (
    set_tensor_array,
    sync_initializer_inputs,
    tensor_array,
    tensor_dtype,
)
from onnx_udfc.ops.registry import op_spec


@dataclass
class SharedCopy:
    """A copy of a shared initializer made for readers that keep other channels than the
    initializer's remaining readers."""

    name: str
    array: np.ndarray
    readers: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)


class Rewriter:
    """What a rule's ``rewrite`` sees: kept channel indices per tensor and constant editing.

    ``keep(name)`` gives the kept positions along the tensor's channel axis in the original
    numbering, or None when the tensor is unchanged.
    """

    def __init__(self, analysis: ChannelAnalysis, removed: np.ndarray) -> None:
        self.analysis = analysis
        self.model = analysis.model
        self.graph = analysis.model.graph
        self.opset = analysis.opset
        self.root = analysis.roots()
        self.removed = removed
        self.inits = {t.name: t for t in self.graph.initializer}
        self.uses: Counter[str] = Counter(n for node in self.graph.node for n in node.input)
        self.uses.update(o.name for o in self.graph.output)
        self._names = set(self.inits) | {o for n in self.graph.node for o in n.output}
        self._keep: dict[str, np.ndarray | None] = {}
        self._inserts: list[tuple[str, onnx.NodeProto]] = []
        self.changed: set[str] = set()
        self.copies: dict[str, list[SharedCopy]] = {}  # shared initializer -> its copies
        self._dropped: set[str] = set()  # copies merged back into their initializer

    def keep(self, name: str) -> np.ndarray | None:
        if name not in self._keep:
            info = self.analysis.tensors.get(name) if name not in self.inits else None
            result = None
            if info is not None and info.slots is not None and len(info.slots):
                gone = self.removed[self.root[info.slots]]
                if gone.any():
                    result = np.flatnonzero(~gone)
                    self.changed.add(name)
            self._keep[name] = result
        return self._keep[name]

    def size(self, name: str) -> int:
        return len(self.analysis.tensors[name].slots)

    def axis(self, name: str) -> int | None:
        info = self.analysis.tensors.get(name)
        return None if info is None else info.axis

    def rank(self, name: str) -> int | None:
        return self.analysis.rank(name)

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name) if name else None
        return None if t is None else tensor_array(t)

    def fresh_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def set_const(self, node: onnx.NodeProto, index: int, array: np.ndarray) -> None:
        """Give input ``index`` of ``node`` a new value. A shared initializer stays shared by
        the readers that give it the same value; the others get a copy (see
        :meth:`duplicated`)."""
        name = node.input[index] if index < len(node.input) else ""
        copies = None
        if name in self.inits:
            array = np.asarray(array, dtype=tensor_dtype(self.inits[name]))
            copies = self.copies.setdefault(name, [])
            same = next((c for c in copies if _identical(c.array, array)), None)
            if self.uses[name] == 1:  # the last reader: the initializer itself changes
                set_tensor_array(self.inits[name], array)
                self.changed.add(name)  # a value_info may still declare its old shape
                if same is not None:
                    self._merge_back(name, same)
                return
            self.uses[name] -= 1
            if same is not None:
                self._point(node, index, same)
                return
        new = self.fresh_name(f"{name or node.name or node.op_type}_pruned")
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), new)
        self.graph.initializer.append(tensor)
        self.inits[new] = self.graph.initializer[-1]
        while len(node.input) <= index:
            node.input.append("")
        if copies is None:
            self.uses[new] = 1
            node.input[index] = new
        else:
            copies.append(SharedCopy(new, array))
            self._point(node, index, copies[-1])

    def _point(self, node: onnx.NodeProto, index: int, copy: SharedCopy) -> None:
        node.input[index] = copy.name
        copy.readers.append((node, index))
        self.uses[copy.name] += 1

    def _merge_back(self, name: str, copy: SharedCopy) -> None:
        """The copy's readers read ``name`` again: it now holds the same value."""
        for node, index in copy.readers:
            node.input[index] = name
        self.uses[name] += len(copy.readers)
        self.uses[copy.name] = 0
        self.copies[name].remove(copy)
        self._dropped.add(copy.name)

    def duplicated(self) -> list[dict[str, Any]]:
        """Every copy of a shared initializer the rewrite left: its readers keep other
        channels than the readers of the initializer (report's ``duplicated_initializers``)."""
        out = []
        for name, copies in self.copies.items():
            if not copies:
                continue
            still = sorted(n.name or n.output[0] for n in self.graph.node if name in n.input)
            out += [{"initializer": name, "copy": c.name,
                     "nodes": [n.name or n.output[0] for n, _ in c.readers],
                     "shared_with": still, "elements": int(c.array.size),
                     "reason": "its readers keep different channels"} for c in copies]
        return out

    def make_gather(self, indices: np.ndarray, axis: int) -> Callable[[str, str], onnx.NodeProto]:
        idx_name = self.fresh_name("channel_indices")
        self.graph.initializer.append(numpy_helper.from_array(indices.astype(np.int64), idx_name))

        def build(x: str, out: str) -> onnx.NodeProto:
            return onnx.helper.make_node("Gather", [x, idx_name], [out], axis=axis,
                                         name=self.fresh_name(f"{out}_gather"))
        return build

    def replace_node(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        new.name = node.name or new.name
        node.CopyFrom(new)

    def insert_after(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self._inserts.append((node.output[0], new))

    def finish(self) -> None:
        if self._inserts:
            after: dict[str, list[onnx.NodeProto]] = {}
            for anchor, new in self._inserts:
                after.setdefault(anchor, []).append(new)
            nodes = []
            for node in self.graph.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                nodes.append(copy)
                nodes.extend(after.get(node.output[0], []) if node.output else [])
            # Node protos are small (weights live in initializers), so rebuilding is cheap.
            del self.graph.node[:]
            self.graph.node.extend(nodes)
        merged = [i for i, t in enumerate(self.graph.initializer) if t.name in self._dropped]
        for i in reversed(merged):
            del self.graph.initializer[i]
        # keep() is asked here too: apply_removal stops asking at a node's first changed tensor.
        stale = [i for i, vi in enumerate(self.graph.value_info)
                 if vi.name in self.changed or self.keep(vi.name) is not None]
        for i in reversed(stale):
            del self.graph.value_info[i]
        sync_initializer_inputs(self.model)


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def apply_removal(analysis: ChannelAnalysis, removed: np.ndarray) -> Rewriter:
    """Physically remove the channel classes flagged in ``removed`` (indexed by class id)."""
    rw = Rewriter(analysis, removed)
    for node in list(analysis.model.graph.node):
        if node.domain not in ("", "ai.onnx") or not node.output \
                or node.output[0] in analysis.untouchable:
            continue
        rule = op_spec(node.op_type).rule
        if rule is None:
            continue
        names = [n for n in list(node.input) + list(node.output) if n]
        if any(rw.keep(n) is not None for n in names):
            rule.rewrite(node, rw)
    rw.finish()
    return rw
