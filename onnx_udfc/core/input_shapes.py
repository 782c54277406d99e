"""The input shapes a run works with when the model leaves some dimensions dynamic.

Detectors and OCR models are exported with dynamic spatial dims (``[1, 1, 64, 'width']``,
``['N', 3, 'H', 'W']``). Channel analysis, FLOPs, sampling, inversion, the sequential fit and
verification all need one concrete size, so every dynamic dimension past the batch gets one, in
this order: ``--input-shape``; a size the model states (its metadata's ``imgsz``-style entry,
else the input's own static spatial sizes: a 64-high text line is sampled 64 wide); else
:data:`DEFAULT_SIDE`. The written model keeps its dynamic dims: only the working copies are
pinned. Inputs whose only dynamic dim is the batch are left as they are (the batch is free
everywhere).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import check_input_shapes, graph_inputs

DEFAULT_SIDE = 224  # a dynamic spatial size the model does not state (ImageNet's side)
# Metadata keys under which exporters record the input size (Ultralytics writes ``imgsz``).
SIZE_KEYS = ("imgsz", "img_size", "image_size", "input_size", "imagesize")


@dataclass(frozen=True)
class WorkingShape:
    dims: list[int]
    origin: str  # "given", "model metadata 'imgsz'", "the input's static sizes", "default 224"

    def to_dict(self) -> dict[str, object]:
        return {"shape": list(self.dims), "from": self.origin}


def declared_dims(inp: onnx.ValueInfoProto) -> list[int | None] | None:
    """The input's dims (None where dynamic), or None when it declares no shape."""
    tt = inp.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim]


def _metadata_sides(model: onnx.ModelProto) -> tuple[str, list[int]] | None:
    for prop in model.metadata_props:
        if prop.key.lower() in SIZE_KEYS:
            sides = [int(v) for v in re.findall(r"\d+", prop.value)]
            if sides and all(0 < s <= 16384 for s in sides):
                return prop.key, sides
    return None


def working_input_shapes(model: onnx.ModelProto,
                         given: Mapping[str, Sequence[int]] | None = None
                         ) -> dict[str, WorkingShape]:
    """Per graph input needing one, the concrete shape a run uses (module docstring): every
    ``--input-shape`` entry, and each input with a dynamic dim past the batch. A dynamic
    channel axis (dim 1) has no sensible default and is refused with the option to pass."""
    given = dict(given or {})
    check_input_shapes(model, given)
    out = {name: WorkingShape([int(d) for d in dims], "given") for name, dims in given.items()}
    metadata = _metadata_sides(model)
    for inp in graph_inputs(model):
        dims = declared_dims(inp)
        if inp.name in out or dims is None or all(d is not None for d in dims[1:]):
            continue
        if dims[1] is None:
            example = "x".join("1" if d is None else str(d) for d in dims)
            raise UdfcError(f"input '{inp.name}' has a dynamic dimension 1 (shape "
                            f"{_shape_text(inp)}) whose size cannot be guessed; pass "
                            f"--input-shape {inp.name}:{example}")
        spatial = len(dims) - 2
        static_sides = [d for d in dims[2:] if d is not None]
        if metadata is not None and len(metadata[1]) in (1, spatial):
            sides = metadata[1] * spatial if len(metadata[1]) == 1 else metadata[1]
            origin = f"model metadata '{metadata[0]}'"
        elif static_sides:
            sides = [max(static_sides)] * spatial
            origin = "the input's static sizes"
        else:
            sides = [DEFAULT_SIDE] * spatial
            origin = f"default {DEFAULT_SIDE}"
        pinned = [dims[0] or 1, dims[1]] + [d if d is not None else s
                                            for d, s in zip(dims[2:], sides, strict=True)]
        out[inp.name] = WorkingShape(pinned, origin)
    return out


def shape_lists(shapes: Mapping[str, WorkingShape]) -> dict[str, list[int]]:
    return {name: list(s.dims) for name, s in shapes.items()}


def pin_inputs(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> None:
    """Write ``shapes`` into the declared inputs of ``model`` (a working copy) in place, the
    batch left as declared."""
    for inp in graph_inputs(model):
        if inp.name not in shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        for axis, size in enumerate(shapes[inp.name]):
            if axis == 0:
                continue
            dims[axis].Clear()
            dims[axis].dim_value = int(size)


def _shape_text(inp: onnx.ValueInfoProto) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else repr(d.dim_param)
                           for d in inp.type.tensor_type.shape.dim) + "]"
