"""Who produces and who reads each tensor of a graph, built once for a pass."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import onnx


@dataclass
class GraphIndex:
    inits: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    readers: Counter[str]  # tensor -> number of node inputs reading it
    outputs: set[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        return cls({t.name: t for t in graph.initializer},
                   {o: n for n in graph.node for o in n.output},
                   Counter(i for n in graph.node for i in n.input),
                   {o.name for o in graph.output})

    def batchnorms(self, graph: onnx.GraphProto
                   ) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto | None]]:
        """Each single-output BatchNormalization with the node producing its input."""
        for bn in graph.node:
            if bn.op_type == "BatchNormalization" and len([o for o in bn.output if o]) == 1:
                yield bn, self.producer.get(bn.input[0])

    def private(self, tensor: str) -> bool:
        """Read by exactly one node and not a graph output: safe to rewrite in place."""
        return self.readers.get(tensor) == 1 and tensor not in self.outputs
