"""Per-channel output error: how far one output drifts from a reference, channel by channel,
each measured against its own spread (see :mod:`onnx_udfc.report.fidelity` for why). Kept low in
the layers because the mixed-precision allocation measures layer sensitivities with it too."""

from __future__ import annotations

import numpy as np

SPREAD_FLOOR = 1e-3  # of the channel's own RMS: a constant channel's spread
MIN_VALUES = 8  # values per channel (samples x positions) to estimate its spread from


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis that holds an output's channels: 1 for ``[N, C, ...]`` and ``[N, K]``; for a
    rank-3 ``[N, A, B]`` the shorter of A and B (YOLO exports write ``[1, 84, 8400]``, others
    ``[1, 8400, 85]``: the short axis holds boxes and class scores). None for a vector."""
    if len(shape) < 2:
        return None
    if len(shape) == 3:
        return 1 if shape[1] <= shape[2] else 2
    return 1


def _channel_rows(reference: np.ndarray, candidate: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs as ``[channels, values]`` float64 rows (one row for a vector)."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(candidate, np.float64)
    axis = channel_axis(a.shape)
    if axis is None:
        return a.reshape(1, -1), b.reshape(1, -1)
    a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    return a, np.moveaxis(b, axis, 0).reshape(a.shape[0], -1)


def channel_errors(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per output channel: RMS of the difference over the channel's spread in ``reference``."""
    a, b = _channel_rows(reference, candidate)
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    rms_a = np.sqrt(np.mean(a ** 2, axis=1))
    if a.shape[1] < MIN_VALUES:  # too few values for a channel's own spread: the output's
        spread = np.full(a.shape[0], float(a.std()) + 1e-12)
    else:
        spread = np.maximum(np.maximum(a.std(axis=1), SPREAD_FLOOR * rms_a),
                            1e-6 * float(a.std()) + 1e-12)
    rms = np.sqrt(np.mean((b - a) ** 2, axis=1))
    return rms / spread


def channel_correlations(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per output channel that varies in ``reference`` (a spread above :data:`SPREAD_FLOOR` of
    its RMS, over at least :data:`MIN_VALUES` values): the Pearson correlation of the two
    models' values over samples and positions. A channel that collapsed to a constant (a
    detector's objectness after bad pruning) reads 0 whatever its error in spread units."""
    a, b = _channel_rows(reference, candidate)
    if a.shape[1] < MIN_VALUES:
        return np.zeros(0)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    sa, sb = np.sqrt((a ** 2).mean(1)), np.sqrt((b ** 2).mean(1))
    varies = sa > SPREAD_FLOOR * np.sqrt(np.mean(np.asarray(reference, np.float64) ** 2) + 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sb > 0, (a * b).mean(1) / (sa * sb), 0.0)
    return r[varies]


def squeeze_inner(output: np.ndarray) -> np.ndarray:
    """A CTC recogniser's ``[T, 1, K]`` logits read as ``[T, K]``, ``[N, K, 1, 1]`` as
    ``[N, K]`` (trailing size-1 axes), while it keeps two axes. A one-channel map
    ``[N, 1, H, W]`` (a text detector's probabilities) keeps its channel axis: squeezed, its
    rows would be read as channels."""
    if output.ndim == 3 and output.shape[1] == 1:
        return output.squeeze(1)
    trailing = []
    for axis in range(output.ndim - 1, 1, -1):
        if output.shape[axis] != 1:
            break
        trailing.append(axis)
    return output.squeeze(tuple(trailing)) if trailing else output


def output_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """One number for a whole network's drift: the mean over outputs of the mean squared
    per-channel error (each output read as :func:`squeeze_inner` reads it). Squared errors of
    independent perturbations add, which is what a per-layer budget sums."""
    if not reference:
        return 0.0
    return float(np.mean([np.mean(channel_errors(squeeze_inner(a), squeeze_inner(b)) ** 2)
                          for a, b in zip(reference, candidate, strict=True)]))
