"""Data-aware moments for ``udfc+ --calibration``: the channel means and covariances of chosen
tensors, measured in ONNX Runtime on a few user inputs (positions pooled with the batch)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnx_udfc.core.graph_edit import with_outputs
from onnx_udfc.core.io import graph_inputs
from onnx_udfc.core.ort import make_inputs, refusals, session, typed_feed
from onnx_udfc.moments.feeds import fixed_inputs
from onnx_udfc.moments.propagated import TensorMoments

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
BATCH = 128
ROWS = 1 << 14  # positions per batch that enter a covariance (an even stride through them)


def load_calibration(source: Any, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """A feed dict from an array (the single input), a dict, or a ``.npz`` path."""
    if isinstance(source, dict):  # a non-float input (an If's condition) keeps its type
        declared = {i.name: i.type.tensor_type.elem_type for i in graph_inputs(model)}
        return {k: np.asarray(v) if declared.get(k, onnx.TensorProto.FLOAT) not in FLOAT_TYPES
                else np.asarray(v, dtype=np.float32) for k, v in source.items()}
    if isinstance(source, np.ndarray):
        return {graph_inputs(model)[0].name: source.astype(np.float32)}
    if isinstance(source, str | os.PathLike):
        return make_inputs(model, data=source)[0]
    raise TypeError(f"calibration must be an array, a dict or a .npz path, not {type(source)}")


def measure(model: onnx.ModelProto, source: Any, tensors: list[str],
            copy: bool = True, axes: Mapping[str, int] | None = None
            ) -> dict[str, TensorMoments]:
    """Mean and centred covariance over (batch, positions) of each tensor's channel axis 1.
    Runs in batches of :data:`BATCH`, one sample at a time when the graph refuses a batch
    (with BatchNorms in training form, as the sampled moments run them, each sample is then
    normalised by its own statistics). ``copy=False``: probe outputs are added to ``model``
    itself (a copy made for this). ``axes``: a tensor's channel axis when it is not 1 (a
    transformer's ``[N, T, C]`` activations)."""
    feed = load_calibration(source, model)
    fixed = fixed_inputs(model)  # fed whole to every batch: they hold no samples
    wanted = list(dict.fromkeys(t for t in tensors if t))
    inputs = {i.name for i in model.graph.input}
    probe = model
    if copy:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    sess = session(with_outputs(probe, [t for t in wanted if t not in inputs]))
    feed = typed_feed(sess, feed)
    names = [o.name for o in sess.get_outputs()]
    n = next((len(v) for k, v in feed.items() if k not in fixed), 1)
    sums: dict[str, list] = {}
    start, step = 0, BATCH
    while start < n:
        part = {k: v if k in fixed else v[start:start + step] for k, v in feed.items()}
        try:
            res = dict(zip(names, sess.run(names, part), strict=True))
        except refusals():
            if step == 1 or start > 0:
                raise
            # A graph that bakes batch 1 into a constant (a Reshape to [1, -1]) refuses a
            # batch: probe one sample at a time and accumulate.
            step = 1
            continue
        start += step
        res.update({k: v for k, v in part.items() if k in wanted})
        for t in wanted:
            a = res.get(t)
            if a is None or a.ndim < 2:
                continue
            axis = (axes or {}).get(t, 1)
            if axis != 1 and a.ndim > 2:
                a = np.moveaxis(a, axis, 1)
            x = _rows(a)
            acc = sums.setdefault(t, [0, 0.0, 0.0, int(np.prod(a.shape[2:]))])
            acc[0] += x.shape[0]
            batch_sum = x.sum(0, dtype=np.float64)
            # products in float32 (BLAS speed), centred first so no large mean cancels; the
            # first batch's mean (``x.mean``'s own sum and division) is the shift
            if len(acc) == 4:
                acc.append(batch_sum / x.shape[0])
            shift = acc[4]
            acc[1] = _accumulate(acc[1], batch_sum)
            xc = (x - shift.astype(x.dtype)).astype(np.float32, copy=False)
            acc[2] = _accumulate(acc[2], (xc.T @ xc).astype(np.float64))
    out = {}
    for t, (cnt, s1, s2, hw, shift) in sums.items():
        mean = s1 / cnt
        d = mean - shift.reshape(-1)  # s2 holds the products about ``shift``
        cov = np.divide(s2, cnt, out=s2)
        if d.any():  # exactly zero when one batch gave both the shift and the mean
            cov -= np.outer(d, d)
        out[t] = TensorMoments(mean, cov, hw)
    return out


def _accumulate(total: np.ndarray | float, part: np.ndarray) -> np.ndarray:
    """``total + part``, into ``part`` (a fresh array) on the first batch, into ``total``
    after: no new [C, C] array per batch."""
    if isinstance(total, np.ndarray):
        total += part
        return total
    part += total
    return part


def _rows(a: np.ndarray) -> np.ndarray:
    """Every ``len // ROWS``-th position of ``a [N, C, ...]`` (in (batch, position) order) as
    a row of its C channels, in float32 at least (float16 models). Gathered directly: moving
    the channel axis last would copy the whole tensor first."""
    positions = int(np.prod(a.shape[2:]))
    count = a.shape[0] * positions
    step = max(1, count // ROWS)
    if a.ndim == 2:
        x = a[::step]
    else:
        idx = np.arange(0, count, step)
        x = a.reshape(a.shape[0], a.shape[1], positions)[idx // positions, :, idx % positions]
    return x.astype(np.float32, copy=False)
