"""The value range an image model expects, so that data-free inputs look like its inputs.

Exporters do not record the pre-processing. ImageNet- and CIFAR-style models read standardised
channels (mean 0, spread 1); YOLOX-style detectors read raw pixels in 0..255 and OCR models
pixels in 0..1. Every data-free input (pink noise, the proxy photographs, the guard's inputs)
is drawn standardised and then moved to the run's range: 255 times too small an input leaves
a detector's activations at their biases, and the compensation is fitted to the wrong signal
(ddddocr's detector at int8: F1 0.979 standardised, 0.988 at 0..255).

``--input-range auto`` reads the range from the network itself. A layer trained under
BatchNorm (kept or folded) writes, on inputs of the right range, per-channel spreads of the
order of its BN scales, about 0.1 to 3; off range by the factor between the ranges (3.7 from
standardised to 0-1, 255 from 0-1 to 0-255), they move by that factor. The first
convolution's output on proxy photographs in each range is measured, and the range whose
median spread is closest to 1 (on a log scale) wins, but it replaces the standardised default
only by a clear margin (:data:`MARGIN`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_udfc.core.input_shapes import pin_inputs
from onnx_udfc.core.ort import run, session
from onnx_udfc.moments import proxy

# Natural images' pixel mean and spread in [0, 1] (ImageNet's, over its channels; crops of the
# proxy photographs measure 0.38 and 0.26): where the 0-1 and 0-255 ranges put an image.
PHOTO_MEAN, PHOTO_STD = 0.45, 0.27
RANGES: dict[str, tuple[float, float]] = {  # name -> (mean, std) of an input channel
    "standardised": (0.0, 1.0),
    "0-1": (PHOTO_MEAN, PHOTO_STD),
    "0-255": (255.0 * PHOTO_MEAN, 255.0 * PHOTO_STD),
}
DEFAULT_RANGE = "standardised"  # RANGES names every choice of config.INPUT_RANGES but auto
NOT_MEASURED = "not measured: the run drew no data-free input"
MARGIN = math.log(2.0)  # another range must be this much closer to 1 than the default
PROBE_IMAGES = 4


class InputRange:
    """The values of the image input: ``name`` (a key of :data:`RANGES`) and ``origin``
    ("given", or the measurement that chose it).

    Built with ``measure`` instead, it is measured the first time it is read: a run that draws
    no data-free input (``--preset fast`` without verification) never pays for the photographs
    and the ONNX Runtime session (0.5 s on ResNet-50)."""

    def __init__(self, name: str | None = None, origin: str = "given", *,
                 measure: Callable[[], tuple[str, str]] | None = None) -> None:
        assert (name is None) != (measure is None), "a range is either known or measured"
        self._value = None if name is None else (name, origin)
        self._measure = measure

    @property
    def resolved(self) -> bool:
        """Whether the range is known (given, or measured already)."""
        return self._value is not None

    def _resolved(self) -> tuple[str, str]:
        if self._value is None:
            assert self._measure is not None
            self._value, self._measure = self._measure(), None  # the probe model is freed
        return self._value

    @property
    def name(self) -> str:
        return self._resolved()[0]

    @property
    def origin(self) -> str:
        return self._resolved()[1]

    @property
    def mean(self) -> float:
        return RANGES[self.name][0]

    @property
    def std(self) -> float:
        return RANGES[self.name][1]

    @property
    def shifts(self) -> bool:
        return self.name != DEFAULT_RANGE

    def to_dict(self) -> dict[str, str | None]:
        """For the report; a range never read (no data-free input drawn) is not measured."""
        if not self.resolved:
            return {"range": None, "from": NOT_MEASURED}
        return {"range": self.name, "from": self.origin}

    def __repr__(self) -> str:
        shown = f"{self.name!r}, {self.origin!r}" if self.resolved else "not measured yet"
        return f"InputRange({shown})"


def resolve_input_range(model: onnx.ModelProto, requested: str,
                        input_shapes: Mapping[str, Sequence[int]] | None = None) -> InputRange:
    """``requested`` as given, or (``auto``) measured on the model's first convolution the
    first time the range is read. The probe (that layer and its weights) is copied out of
    ``model`` now: a later change to ``model`` (pruning, rounding) does not change the range."""
    if requested != "auto":
        return InputRange(requested, "given")
    images = proxy.image_inputs(model, input_shapes)
    if len(images) != 1:
        return InputRange(DEFAULT_RANGE, "no single image input")
    (name, dims), = images.items()
    tensor = _first_layer(model, name)
    if tensor is None:
        return InputRange(DEFAULT_RANGE, "no convolution reads the image input alone")
    probe = _subgraph(model, name, tensor)
    if input_shapes:
        pin_inputs(probe, {k: v for k, v in input_shapes.items() if k == name})
    return InputRange(measure=lambda: _measured(probe, tensor, name, dims))


def _measured(probe: onnx.ModelProto, tensor: str, image: str, dims: Sequence[int]
              ) -> tuple[str, str]:
    """The range whose spreads of ``tensor`` (the output of ``probe``) are closest to 1."""
    spreads = _spreads(probe, image, dims)
    if not spreads:
        return DEFAULT_RANGE, f"'{tensor}' does not vary on photographs"
    distance = {r: abs(math.log(s)) for r, s in spreads.items()}
    best = min(distance, key=distance.get)  # type: ignore[arg-type]
    if best != DEFAULT_RANGE and distance[best] + MARGIN > distance[DEFAULT_RANGE]:
        best = DEFAULT_RANGE
    shown = ", ".join(f"{spreads[r]:.3g} at {r}" for r in RANGES)
    return best, f"auto: '{tensor}' spreads {shown} on photographs"


def _first_layer(model: onnx.ModelProto, image: str) -> str | None:
    """The output of the first Conv fed by ``image`` (its BatchNorm's output when one follows
    it alone), computable from ``image`` and the weights only."""
    weights = {t.name for t in model.graph.initializer}
    known = {image} | weights
    for node in model.graph.node:
        if not all(not i or i in known for i in node.input):
            continue
        if node.op_type == "Conv" and node.input[0] not in weights:
            tensor = node.output[0]
            readers = [n for n in model.graph.node if tensor in n.input]
            if len(readers) == 1 and readers[0].op_type == "BatchNormalization":
                tensor = readers[0].output[0]
            return tensor
        known.update(node.output)
    return None


def _subgraph(model: onnx.ModelProto, image: str, tensor: str) -> onnx.ModelProto:
    """The nodes and weights that compute ``tensor`` from ``image``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    needed: set[int] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    order = [n for n in model.graph.node if id(n) in needed]
    used = {i for n in order for i in n.input}
    source = next(i for i in model.graph.input if i.name == image)
    graph = onnx.helper.make_graph(
        order, "input_range_probe", [source],
        [onnx.helper.make_tensor_value_info(tensor, source.type.tensor_type.elem_type, None)],
        [t for t in model.graph.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)


def _spreads(probe: onnx.ModelProto, image: str, dims: Sequence[int]) -> dict[str, float]:
    """Per range, the median over channels of the spread of ``probe``'s output on proxy
    photographs."""
    runner = session(probe)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(probe.graph.input[0].type.tensor_type.elem_type)
    photos = proxy.proxy_batch(PROBE_IMAGES, *dims[1:], np.random.default_rng(0))
    standardised = proxy.standardise(photos, None, None)
    spreads = {}
    for name, (mean, std) in RANGES.items():
        out = run(runner, {image: (standardised * std + mean).astype(dtype)})[0]
        spread = out.reshape(out.shape[0], out.shape[1], -1).std(axis=(0, 2), dtype=np.float64)
        spread = spread[spread > 0]
        if len(spread):
            spreads[name] = float(np.median(spread))
    return spreads if len(spreads) == len(RANGES) else {}
