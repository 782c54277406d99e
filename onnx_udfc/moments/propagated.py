"""Data-free propagation of per-channel activation moments through a model.

Every tensor gets a :class:`TensorMoments`: the mean of each channel and the centred channel
covariance (spatial positions pooled). The input is modelled as independent channels with
user-given mean/std (default N(0, 1), the normalised input). Weight layers map moments
linearly; a 3x3 patch is modelled as ``C_in (x) ((1 - r) I + r 11^T)`` (spatial correlation
``r`` between the positions of a patch); activations use the Gaussian model of
:mod:`onnx_udfc.moments.gaussian`; a residual Add sums independent branches.

BatchNorm *anchors* the model: its output has mean beta and variance gamma^2 on the training
data, whatever the propagated scale, so only the propagated correlation is kept there. On a
BN-folded model nothing anchors and the propagated moments are used as they are.
Ops the model does not know make their outputs unknown (absent from the result).

Cost. A covariance may be held as its diagonal (a 1-D ``cov``: channels uncorrelated). Full
``[C, C]`` covariances are computed only for tensors whose full covariance is asked for (the
``keep`` tensors) and their ancestors, only up to ``max_full`` channels, and only while a
layer's work stays under ``max_work`` multiply-adds; everything else carries variances only
(the means and variances are the same either way). Large products run in float32 (the
moments are statistics of a model, far coarser than float32 rounding). Tensors no longer
needed are dropped as the walk goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx

from onnx_udfc.core.io import tensor_array
from onnx_udfc.moments.gaussian import gaussian_moments
from onnx_udfc.ops.registry import op_spec
from onnx_udfc.ops.tensor_moments import MAX_FULL, MomentStep, TensorMoments


def _diag_only(m: TensorMoments) -> TensorMoments:
    return m if m.diagonal else TensorMoments(m.mean, np.diag(m.cov).copy(), m.hw)


def needs_full(model: onnx.ModelProto, keep: Iterable[str]) -> set[str]:
    """The ``keep`` tensors and every tensor their full covariance depends on."""
    need = set(keep)
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output):
            need.update(i for i in node.input if i)
    return need


def propagate(model: onnx.ModelProto, shapes: dict, *, spatial: float = 0.5,
              anchor: bool = True, fit_spatial: bool = False, max_full: int = MAX_FULL,
              input_mean: Sequence[float] | None = None,
              input_std: Sequence[float] | None = None,
              keep: Iterable[str] | None = None) -> dict[str, TensorMoments]:
    """Moments of every tensor the model can follow (see the module doc). With ``keep``,
    only those tensors are returned, and only they and their ancestors get full
    covariances."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out: dict[str, TensorMoments] = {}
    targets: dict[str, np.ndarray] = {}
    wanted = None if keep is None else set(keep)
    need = None if wanted is None else needs_full(model, wanted)
    last: dict[str, int] = {}
    if wanted is not None:
        for i, node in enumerate(g.node):
            for name in node.input:
                last[name] = i
    if fit_spatial:
        for n in g.node:
            if n.op_type == "BatchNormalization" and n.input[4] in inits:
                var = tensor_array(inits[n.input[4]]).astype(np.float64)
                targets[n.input[0]] = var
    for inp in g.input:
        if inp.name in inits:
            continue
        shape = shapes.get(inp.name)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            continue
        c = int(shape[1])
        hw = int(np.prod([d for d in shape[2:]])) if len(shape) > 2 else 1
        mean = np.zeros(c) if input_mean is None else np.broadcast_to(
            np.asarray(input_mean, float), (c,)).copy()
        std = np.ones(c) if input_std is None else np.broadcast_to(
            np.asarray(input_std, float), (c,))
        out[inp.name] = TensorMoments(mean, np.asarray(std, float) ** 2, hw)
    for i, node in enumerate(g.node):
        full = need is None or (bool(node.output) and node.output[0] in need)
        try:
            res = _step(MomentStep(node, inits, out, shapes, spatial, anchor, max_full, full,
                                   targets))
        except (ValueError, IndexError, KeyError):
            res = None
        if res is not None and node.output and np.all(np.isfinite(res.cov)):
            out[node.output[0]] = res if full else _diag_only(res)
        if wanted is not None:
            for name in node.input:
                if last.get(name) == i and name not in wanted:
                    out.pop(name, None)
    if wanted is not None:
        return {k: v for k, v in out.items() if k in wanted}
    return out


def _step(step: MomentStep) -> TensorMoments | None:
    """The node's own rule: the Gaussian model for an activation, else its moment rule."""
    x = step.x
    if x is None:
        return None
    spec = op_spec(step.node.op_type)
    if spec.activation is not None:
        cov = x.cov if step.full or x.diagonal else np.diag(x.cov)
        mean, cov = gaussian_moments(x.mean, cov, spec.activation(step.node, step.const))
        return TensorMoments(mean, cov, x.hw)
    return None if spec.propagate is None else spec.propagate(step)
