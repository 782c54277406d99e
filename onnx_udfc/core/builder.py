"""A patch of nodes and constants with fresh names, to append to a graph."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnx_udfc.core.graph_edit import Patch


class Builder(Patch):
    """Nodes and constants with fresh names (:class:`~onnx_udfc.core.graph_edit.Patch`): each
    call returns the name of what it made; :meth:`append_to` adds them to the host graph."""

    def __init__(self, opset: int) -> None:
        super().__init__(opset)
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"udfc_inv{self.count}_{hint}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        return self.constant(self.name(hint), value)

    def op(self, op_type: str, inputs: list[str], hint: str = "", output: str | None = None,
           **attrs: object) -> str:
        """``op_type`` on ``inputs``; its output is ``output`` or a fresh name."""
        out = output or self.name(hint or op_type.lower())
        self.node(op_type, inputs, [out], **attrs)
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        axes_name = self.name("axes") if self.axes_as_input(op_type) else ""
        out = self.name(op_type.lower())
        self.reduce_to(op_type, x, axes, out, axes_name, keepdims)
        return out


def unique_namer(taken: set[str]) -> Callable[[str], str]:
    """``fresh(base)``: ``base``, or ``base_1``, ``base_2``, ... whichever is not yet in
    ``taken`` (which it then joins)."""
    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name
    return fresh
