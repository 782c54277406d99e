"""Apply a pruning plan to the graph: every rule rewrites its node for the kept channels."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.core.io import set_tensor_array, sync_initializer_inputs, tensor_array
from onnx_udfc.ops.registry import op_spec


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
        """Give input ``index`` of ``node`` a new value; shared initializers are copied first."""
        name = node.input[index] if index < len(node.input) else ""
        if name in self.inits:
            array = np.asarray(array, dtype=tensor_array(self.inits[name]).dtype)
            if self.uses[name] == 1:
                set_tensor_array(self.inits[name], array)
                self.changed.add(name)  # a value_info may still declare its old shape
                return
            self.uses[name] -= 1
        new = self.fresh_name(f"{name or node.name or node.op_type}_pruned")
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), new)
        self.graph.initializer.append(tensor)
        self.inits[new] = self.graph.initializer[-1]
        self.uses[new] = 1
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new

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
        # keep() is asked here too: apply_removal stops asking at a node's first changed tensor.
        stale = [i for i, vi in enumerate(self.graph.value_info)
                 if vi.name in self.changed or self.keep(vi.name) is not None]
        for i in reversed(stale):
            del self.graph.value_info[i]
        sync_initializer_inputs(self.model)


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
