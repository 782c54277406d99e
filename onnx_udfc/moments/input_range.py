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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
MARGIN = math.log(2.0)  # another range must be this much closer to 1 than the default
PROBE_IMAGES = 4


@dataclass(frozen=True)
class InputRange:
    name: str
    origin: str  # "given", or the measurement that chose it

    @property
    def mean(self) -> float:
        return RANGES[self.name][0]

    @property
    def std(self) -> float:
        return RANGES[self.name][1]

    @property
    def shifts(self) -> bool:
        return self.name != DEFAULT_RANGE

    def to_dict(self) -> dict[str, str]:
        return {"range": self.name, "from": self.origin}


def resolve_input_range(model: onnx.ModelProto, requested: str,
                        input_shapes: Mapping[str, Sequence[int]] | None = None) -> InputRange:
    """``requested`` as given, or (``auto``) measured on the model's first convolution."""
    if requested != "auto":
        return InputRange(requested, "given")
    images = proxy.image_inputs(model, input_shapes)
    if len(images) != 1:
        return InputRange(DEFAULT_RANGE, "no single image input")
    (name, dims), = images.items()
    probe = _first_layer(model, name)
    if probe is None:
        return InputRange(DEFAULT_RANGE, "no convolution reads the image input alone")
    spreads = _spreads(model, probe, name, dims, input_shapes)
    if not spreads:
        return InputRange(DEFAULT_RANGE, f"'{probe}' does not vary on photographs")
    distance = {r: abs(math.log(s)) for r, s in spreads.items()}
    best = min(distance, key=distance.get)
    if best != DEFAULT_RANGE and distance[best] + MARGIN > distance[DEFAULT_RANGE]:
        best = DEFAULT_RANGE
    shown = ", ".join(f"{spreads[r]:.3g} at {r}" for r in RANGES)
    return InputRange(best, f"auto: '{probe}' spreads {shown} on photographs")


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


def _spreads(model: onnx.ModelProto, tensor: str, image: str, dims: Sequence[int],
             input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, float]:
    """Per range, the median over channels of ``tensor``'s spread on proxy photographs."""
    probe = _subgraph(model, image, tensor)
    if input_shapes:
        pin_inputs(probe, {k: v for k, v in input_shapes.items() if k == image})
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
