"""GPTQ (:mod:`~.gptq`) for one weight layer of the graph, with the Hessian taken from the
moments of the layer's input (udfc+): a :class:`QuantResult` grid re-rounded with error
feedback."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from onnx_udfc.channels.stats import LayerWeights
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.quant.gptq import gptq_round, kron_hessian
from onnx_udfc.quant.grids import QuantResult

MAX_INPUTS = 600  # larger layers round to nearest: GPTQ costs O(out x in^2)


def grid_function(q: QuantResult) -> Callable[[np.ndarray, int], np.ndarray] | None:
    """The nearest-level map of a per-tensor or per-output-channel :class:`QuantResult` grid
    (column values ``[O]`` -> levels), None for block-wise grids."""
    if q.block_size is not None:
        return None
    scale = np.asarray(q.scale, dtype=np.float64)
    if q.scheme == "paper":
        levels = 2 ** q.bits - 1
        half = scale * levels / 2.0  # max|W|

        def paper(v: np.ndarray, _j: int) -> np.ndarray:
            safe = np.where(half > 0, half, 1.0)
            n = np.clip(np.round(levels * (v / (2.0 * safe) + 0.5)), 0, levels)
            return np.where(half > 0, half * (2.0 / levels * n - 1.0), 0.0)
        return paper
    zp = np.asarray(q.zero_point, dtype=np.float64)
    lo, hi = (-(2 ** (q.bits - 1) - 1), 2 ** (q.bits - 1) - 1) if q.scheme == "symmetric" \
        else (0, 2 ** q.bits - 1)

    def integer(v: np.ndarray, _j: int) -> np.ndarray:
        return (np.clip(np.round(v / scale) + zp, lo, hi) - zp) * scale
    return integer


def gptq_layer(layer: LayerWeights, f: np.ndarray, q: QuantResult,
               moments: dict[str, TensorMoments], dims: list[int], spatial: float,
               max_inputs: int = MAX_INPUTS) -> QuantResult | None:
    """Re-round ``f [O, D]`` on ``q``'s grid with GPTQ under the input's second moments
    (Conv patches: channel moments (x) a tap correlation of ``spatial`` between every two
    taps); returns the new :class:`QuantResult`, or None when the layer's input has no full
    moments or more than ``max_inputs`` columns."""
    m = moments.get(layer.node.input[0])
    grid = grid_function(q)
    if m is None or m.diagonal or grid is None or f.shape[1] > max_inputs:
        return None
    second = m.cov + np.outer(m.mean, m.mean)
    if layer.node.op_type == "Conv":
        group = int(next((a.i for a in layer.node.attribute if a.name == "group"), 1))
        taps = int(np.prod(dims[2:])) if len(dims) > 2 else 1
        if group != 1 or dims[1] != m.mean.size or f.shape[1] != dims[1] * taps:
            return None
        r = spatial
        hessian = kron_hessian(second, (1 - r) * np.eye(taps) + r * np.ones((taps, taps)))
    elif f.shape[1] == m.mean.size:
        hessian = second
    else:
        return None
    deq = gptq_round(f, hessian, grid)
    codes = None
    if q.q is not None:
        scale = np.asarray(q.scale, dtype=np.float64).reshape(-1, *([1] * (f.ndim - 1)))
        zp = np.asarray(q.zero_point, dtype=np.float64).reshape(scale.shape)
        codes = (np.round(deq / scale) + zp).astype(q.q.dtype).reshape(q.q.shape)
    return dataclasses.replace(q, dequantized=deq.astype(q.dequantized.dtype).reshape(
        q.dequantized.shape), q=codes)
