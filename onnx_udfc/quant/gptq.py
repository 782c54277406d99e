"""Data-free GPTQ weight rounding for a layer whose input second moments are modelled.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", itself built on OBQ / Optimal Brain Surgeon) chooses grid values
``Wq`` for a weight matrix ``W`` ``[O, D]`` (one row per output channel) that minimise the
expected squared output error of the layer

    E ||(W - Wq) x||^2 = sum_o (w_o - q_o)^T H (w_o - q_o),    H = E[x x^T]  ([D, D]).

Rows share ``H`` and are independent, so all of them are handled at once. Columns are rounded
one at a time in natural order; after column ``j`` is fixed, the rounding error is spread over
the columns not yet rounded so as to cancel it as well as ``H`` allows (the OBS update). With
``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``) that update is
``w[:, k] -= (w_j - q_j) / U[j, j] * U[j, k]`` for ``k > j``; the row ``U[j, j:]`` already
accounts for the columns rounded earlier, so no inverse has to be updated inside the loop.
Updates are applied lazily per block of columns (a rank-``block`` matmul for the rest of the
matrix), which gives the same result as column-by-column updates.

Round-to-nearest is the special case of a diagonal ``H`` (no feedback between columns). Here
``H`` does not come from calibration data but from a statistical model of the activations:
for a Conv, :func:`kron_hessian` builds it from per-channel second moments and a correlation
between kernel taps (:func:`tap_correlation`).

Pure NumPy / SciPy on arrays; no ONNX types.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

Grid = Callable[[np.ndarray, int], np.ndarray]


def _cholesky_inverse_upper(hessian: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``hessian^-1`` (``hessian^-1 = U^T U``).

    A PSD ``hessian`` that is singular (possible with ``damp=0``) gets a growing jitter on the
    diagonal instead of failing: the result is then GPTQ for a barely regularised ``H``.
    """
    import scipy.linalg  # imported on use: it adds 0.25 s to every run's start

    scale = float(np.mean(np.diag(hessian)))
    eye = np.eye(hessian.shape[0])
    jitters = [0.0] + [scale * 10.0**k for k in range(-10, 1)]
    for jitter in jitters:
        try:
            lower = scipy.linalg.cholesky(hessian + jitter * eye, lower=True)
            inverse = scipy.linalg.cho_solve((lower, True), eye)
            # cho_solve leaves round-off asymmetry that cholesky would see as non-PSD.
            inverse = 0.5 * (inverse + inverse.T)
            return scipy.linalg.cholesky(inverse, lower=False)
        except np.linalg.LinAlgError:
            continue
    raise ValueError("gptq_round: the Hessian is not positive semidefinite (Cholesky failed "
                     "even with a diagonal jitter of mean(diag(H)))")


def _grid_column(grid: Grid, column: np.ndarray, j: int) -> np.ndarray:
    """Call the caller's quantizer on a copy (it must not alter our working state)."""
    values = np.asarray(grid(column.copy(), j), dtype=np.float64)
    if values.shape != column.shape:
        raise ValueError(f"gptq_round: grid returned shape {values.shape} for column {j}, "
                         f"expected {column.shape}")
    return values


def gptq_round(filters: np.ndarray, hessian: np.ndarray,
               grid: Callable[[np.ndarray, int], np.ndarray], damp: float = 0.01,
               block: int = 128) -> np.ndarray:
    """Round ``filters`` ``[O, D]`` onto ``grid`` minimising ``sum_o (w-q)^T H (w-q)``.

    Args:
        filters: ``[O, D]`` float weights, one row per output channel (a Conv weight flattened
            to ``[O, C * prod(kernel)]``).
        hessian: ``[D, D]`` symmetric PSD second moment ``E[x x^T]`` of the layer input.
        grid: ``grid(column, j)`` returns, for the ``[O]`` values of column ``j``, the nearest
            representable (dequantized) value of each entry, clamped to the grid's range; a
            per-output-channel scale is applied by the caller inside it.
        damp: fraction of ``mean(diag(H))`` added to the diagonal (GPTQ's percdamp), which
            keeps ``H`` invertible and limits how far the error is pushed around.
        block: number of columns per lazy batch update; it changes speed, not the result.

    Returns:
        ``[O, D]`` float64 values, each one returned by ``grid``.

    Inputs whose second moment is zero (``H_jj == 0``) never contribute to the output, so
    their weights are rounded plainly and take no error from the other columns.
    """
    w = np.array(filters, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"gptq_round: filters must be 2-D [O, D], got shape {w.shape}")
    n_out, dim = w.shape
    if n_out == 0 or dim == 0:
        raise ValueError(f"gptq_round: filters must be non-empty, got shape {w.shape}")
    if h.shape != (dim, dim):
        raise ValueError(f"gptq_round: hessian must be [{dim}, {dim}] to match filters "
                         f"{w.shape}, got shape {h.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise ValueError("gptq_round: filters and hessian must be finite")
    if not damp >= 0.0:
        raise ValueError(f"gptq_round: damp must be >= 0, got {damp}")
    if int(block) != block or block < 1:
        raise ValueError(f"gptq_round: block must be a positive integer, got {block}")
    block = int(block)

    h = 0.5 * (h + h.T)
    # A PSD matrix with a zero diagonal entry has that whole row and column zero; clearing
    # them explicitly keeps a slightly inconsistent model from leaking error into dead inputs.
    dead = np.diag(h) <= 0.0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices(dim)] += damp * float(np.mean(np.diag(h)))

    u = _cholesky_inverse_upper(h)
    # Exact zeros make dead columns neither send nor receive error feedback (plain rounding),
    # whatever round-off the inverse left.
    diag_dead = np.diag(u)[dead].copy()
    u[dead, :] = 0.0
    u[:, dead] = 0.0
    u[dead, dead] = diag_dead

    # The block is worked on transposed (one contiguous row per column of ``w``), and the
    # rank-1 updates go through one scratch buffer: the same products and differences as
    # updating ``w``'s columns in place, element by element, without strided reads or a new
    # temporary per column.
    q_t = np.empty((dim, n_out))
    scratch = np.empty((min(block, dim), n_out))
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        w_t = np.ascontiguousarray(w[:, start:stop].T)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            column = w_t[i]
            q_col = _grid_column(grid, column, start + i)
            q_t[start + i] = q_col
            err = np.subtract(column, q_col, out=column)
            err /= u_block[i, i]
            rest = w_t[i + 1:]
            product = np.multiply(u_block[i, i + 1:, None], err[None, :],
                                  out=scratch[:len(rest)])
            rest -= product
        # Columns after the block only see the block's accumulated error (left in ``w_t``'s
        # rows), in one matmul.
        err_block = np.ascontiguousarray(w_t.T)
        w[:, stop:] -= err_block @ u[start:stop, stop:]
    return np.ascontiguousarray(q_t.T)


def kron_hessian(channel_second: np.ndarray, tap_correlation: np.ndarray) -> np.ndarray:
    """Second moment of a Conv input patch under the separable (Kronecker) model.

    A Conv weight ``[O, C, *kernel]`` flattened to ``[O, C * K]`` (``K = prod(kernel)``,
    row-major, so column ``c * K + t`` is channel ``c`` at tap ``t``) reads a patch
    ``x[c, p + offset_t]``. Modelling the patch's second moments as separable,
    ``E[x_{c,t} x_{c',t'}] = S[c, c'] * R[t, t']``, gives ``H = kron(S, R)``.

    Args:
        channel_second: ``[C, C]`` channel second moments ``S = E[x_c x_c']``.
        tap_correlation: ``[K, K]`` correlation ``R`` between kernel taps (unit diagonal).

    Returns:
        ``[C * K, C * K]`` float64 matrix with ``H[c*K + t, c2*K + t2] = S[c, c2] * R[t, t2]``.
    """
    s = np.asarray(channel_second, dtype=np.float64)
    r = np.asarray(tap_correlation, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"kron_hessian: channel_second must be square [C, C], got {s.shape}")
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"kron_hessian: tap_correlation must be square [K, K], got {r.shape}")
    return np.kron(s, r)


def _check_ints(name: str, values: Sequence[int], ndim: int) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) != ndim or any(int(v) != v or v < 1 for v in values):
        raise ValueError(f"tap_correlation: {name} must be {ndim} positive integers "
                         f"(one per spatial axis), got {values}")
    return tuple(int(v) for v in values)


def _lag_moment(x: np.ndarray, lag: tuple[int, ...], max_positions: int,
                draws: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Mean of ``x[n, p, c] * x[n, p + lag, c]`` over channels and anchors ``p`` whose both
    ends lie inside the tensor; ``None`` where no such pair exists.

    ``x`` is ``[N, *spatial, C]``. Beyond ``max_positions`` anchors a random subset is used;
    every lag maps the same uniform draws into its own anchor range, so estimates of
    different lags share their noise and the assembled matrix stays close to PSD.
    """
    spatial = x.shape[1:-1]
    lo = [max(0, -d) for d in lag]
    length = [s - abs(d) for s, d in zip(spatial, lag, strict=True)]
    if any(n <= 0 for n in length):
        return None
    n_anchor = x.shape[0] * int(np.prod(length))
    if n_anchor <= max_positions:
        src = tuple(slice(a, a + n) for a, n in zip(lo, length, strict=True))
        dst = tuple(slice(a + d, a + d + n) for a, d, n in zip(lo, lag, length, strict=True))
        return float(np.mean(x[(slice(None), *src)] * x[(slice(None), *dst)]))
    u_batch, u_pos = draws
    batch = np.minimum((u_batch * x.shape[0]).astype(np.intp), x.shape[0] - 1)
    pos = [a + np.minimum((u_pos[:, i] * n).astype(np.intp), n - 1)
           for i, (a, n) in enumerate(zip(lo, length, strict=True))]
    shifted = [p + d for p, d in zip(pos, lag, strict=True)]
    return float(np.mean(x[(batch, *pos)] * x[(batch, *shifted)]))


def tap_correlation(activations: np.ndarray, kernel: Sequence[int],
                    dilations: Sequence[int] | None = None, max_positions: int = 4096,
                    seed: int = 0) -> np.ndarray:
    """Correlation ``R`` ``[K, K]`` between the taps of a Conv kernel, from sample activations.

    The activations ``[N, C, *spatial]`` are centred and scaled to unit variance per channel
    (over ``N`` and all positions). For taps ``a`` and ``b`` at offsets ``da``, ``db``
    (kernel index times dilation), ``R[a, b]`` is the mean over channels and over anchor
    positions ``p`` with both ``p + da`` and ``p + db`` inside the tensor (no padding) of
    ``x[p + da] * x[p + db]``. That mean only depends on ``db - da``, so it is computed once
    per lag. A lag longer than the tensor has no valid pair and gets correlation 0, as do
    all lags when every channel is constant. Taps are ordered row-major over the kernel's
    axes, matching the flattened weight layout of :func:`kron_hessian`.

    Args:
        activations: ``[N, C, *spatial]`` samples of the Conv's input, 1 to 3 spatial axes.
        kernel: kernel size per spatial axis.
        dilations: dilation per spatial axis (default 1).
        max_positions: anchors used per lag at most; beyond it a deterministic random subset
            (drawn with ``seed``) is used.
        seed: seed of that subset.

    Returns:
        Symmetric PSD ``[K, K]`` float64 matrix with unit diagonal (``[[1.0]]`` for a 1x1
        kernel). Sampling noise that makes the estimate indefinite is removed by clipping
        negative eigenvalues to 0 and rescaling to unit diagonal again.
    """
    x = np.asarray(activations, dtype=np.float64)
    if x.ndim < 3:
        raise ValueError(f"tap_correlation: activations must be [N, C, *spatial] with at least "
                         f"one spatial axis, got shape {x.shape}")
    ndim = x.ndim - 2
    kernel_t = _check_ints("kernel", kernel, ndim)
    dil_t = _check_ints("dilations", [1] * ndim if dilations is None else dilations, ndim)
    if int(max_positions) != max_positions or max_positions < 1:
        raise ValueError(f"tap_correlation: max_positions must be a positive integer, "
                         f"got {max_positions}")
    if x.size == 0:
        raise ValueError(f"tap_correlation: activations are empty, shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("tap_correlation: activations must be finite")
    n_taps = int(np.prod(kernel_t))
    if n_taps == 1:
        return np.ones((1, 1))

    axes = (0, *range(2, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    std = np.sqrt(np.mean(x * x, axis=axes))
    live = std > 0.0
    if not np.any(live):
        return np.eye(n_taps)
    x = x[:, live] / std[live].reshape((-1,) + (1,) * ndim)
    # Channels last, so a gather at (n, *p) reads one contiguous row of channels.
    x = np.ascontiguousarray(np.moveaxis(x, 1, -1))

    rng = np.random.default_rng(seed)
    draws = (rng.random(int(max_positions)), rng.random((int(max_positions), ndim)))
    # Index grid of tap differences (b - a) per axis, in kernel units: -(k-1) .. k-1.
    moments = np.zeros(tuple(2 * k - 1 for k in kernel_t))
    for diff in itertools.product(*(range(-(k - 1), k) for k in kernel_t)):
        neg = tuple(-v for v in diff)
        if neg < diff:
            continue  # filled together with its mirror: lag -d pairs the same positions.
        lag = tuple(v * d for v, d in zip(diff, dil_t, strict=True))
        value = _lag_moment(x, lag, int(max_positions), draws)
        value = 0.0 if value is None else value
        moments[tuple(v + k - 1 for v, k in zip(diff, kernel_t, strict=True))] = value
        moments[tuple(v + k - 1 for v, k in zip(neg, kernel_t, strict=True))] = value

    taps = np.array(list(np.ndindex(*kernel_t)), dtype=np.intp)  # row-major, [K, ndim]
    diffs = taps[None, :, :] - taps[:, None, :] + (np.array(kernel_t) - 1)
    r = moments[tuple(diffs[..., i] for i in range(ndim))]
    r = r / moments[tuple(k - 1 for k in kernel_t)]
    r = 0.5 * (r + r.T)
    return _nearest_correlation(r)


def _nearest_correlation(r: np.ndarray) -> np.ndarray:
    """Clip negative eigenvalues to 0, then rescale to unit diagonal (a PSD correlation)."""
    eigval, eigvec = np.linalg.eigh(r)
    if eigval[0] < 0.0:
        r = (eigvec * np.maximum(eigval, 0.0)) @ eigvec.T
        d = np.sqrt(np.diag(r))
        d[d <= 0.0] = 1.0
        r = r / np.outer(d, d)
        r = 0.5 * (r + r.T)
    np.fill_diagonal(r, 1.0)
    return r
