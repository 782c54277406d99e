"""How much a change of some weights moves the network's outputs, measured in ONNX Runtime.

Budgets ask the same question many times (every layer at 4 bits, every channel group removed):
one session serves them all, with the weights in question turned into graph inputs and fed per
run. The samples are the run's (``--calibration`` inputs when given, else the data-free ones of
the moment source), at most :data:`MAX_SAMPLES` and about :data:`POSITIONS` input positions. The
drift is :func:`onnx_udfc.core.drift.output_error` against the unchanged network's outputs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from onnx_udfc.core.drift import output_error
from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.ort import refusals, run, session
from onnx_udfc.moments.feeds import fixed_inputs
from onnx_udfc.moments.source import MomentSource, refusal_cause

POSITIONS = 1 << 15  # input positions (samples x pixels) per run
MIN_SAMPLES, MAX_SAMPLES = 4, 32


class DriftProbe:
    """Output drift of ``model`` under replaced weights (``weights``: initializer names)."""

    def __init__(self, model: onnx.ModelProto, weights: Iterable[str],
                 source: MomentSource) -> None:
        inits = {t.name: t for t in model.graph.initializer}
        self.weights = {name: tensor_array(inits[name]) for name in dict.fromkeys(weights)}
        self.cause: str | None = None  # why the network could not be run, when it could not
        self.samples = 0
        self.kind = "calibration" if source.calibration is not None else source.kind
        try:
            self.feed = _samples(model, source)
            self.session = session(_weights_as_inputs(model, set(self.weights)))
            self.reference = run(self.session, self.feed, constants=self.weights)
            self.samples = len(next(iter(self.feed.values())))
        except refusals() as exc:
            self.cause = refusal_cause(exc)

    @property
    def available(self) -> bool:
        return self.cause is None

    def drift(self, replaced: dict[str, np.ndarray]) -> float:
        """The outputs' drift with ``replaced`` weights (name -> array in its own layout)."""
        out = run(self.session, self.feed, constants={**self.weights, **replaced})
        return output_error(self.reference, out)

    def describe(self) -> str:
        if self.available:
            return f"output drift measured on {self.samples} {self.kind} samples"
        return f"the network could not run: {self.cause}"


def _samples(model: onnx.ModelProto, source: MomentSource) -> dict[str, np.ndarray]:
    feed = source.sample_feed(model, MAX_SAMPLES)
    fixed = fixed_inputs(model)
    drawn = [v for k, v in feed.items() if k not in fixed]
    pixels = max((int(np.prod(v.shape[2:])) for v in drawn if v.ndim > 2), default=1)
    n = int(np.clip(POSITIONS // max(pixels, 1), MIN_SAMPLES, MAX_SAMPLES))
    return {k: v if k in fixed else v[:n] for k, v in feed.items()}


def _weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` (sharing no weight data) whose ``names`` initializers are graph
    inputs, so one session serves every variant."""
    g = model.graph
    out = onnx.ModelProto()
    out.ir_version = max(model.ir_version, 4)
    out.opset_import.extend(model.opset_import)
    out.graph.name = g.name
    out.graph.node.extend(g.node)
    out.graph.output.extend(g.output)
    out.graph.input.extend(i for i in g.input if i.name not in names)
    for t in g.initializer:
        if t.name in names:
            out.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                      list(t.dims)))
        else:
            out.graph.initializer.append(t)
    return out
