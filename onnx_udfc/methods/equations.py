"""Closed-form compensation of UDFC (Bai et al., ICCV 2023) and the Neuron Merging baseline.

Pure NumPy; equation numbers are the paper's, as restated in ``shared/reference/METHOD.md``.
Conventions: layer l has filters ``F`` of shape ``[N, ...]`` (flattened to ``[N, D]``) and
per-channel affine post-processing described by :class:`ChannelStats`; the next layer's weight
``Wn`` is ``[O, N, r]`` (input channel n owns the block ``Wn[:, n, :]``; a 2-D ``[O, N]`` is
accepted as r = 1). Index arguments (``kept``, ``pruned``) are original channel numbers, and
every result follows their order. Inputs are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from onnx_udfc.channels.stats import ChannelStats, finite_vector
from onnx_udfc.quant.grids import QuantResult, quantize, quantize_params


def folded_filters(F: ArrayLike, stats: ChannelStats) -> np.ndarray:
    """BN-scaled filters ``R_i = gamma_i / sigma_i * vec(F_i)``, shape ``[N, D]``."""
    f = np.asarray(F, dtype=np.float64).reshape(stats.n, -1)
    return f * (stats.gamma / stats.sigma)[:, None]


def folded_bias(conv_bias: ArrayLike | None, stats: ChannelStats) -> np.ndarray:
    """BN-folded bias ``K_i = beta_i + gamma_i * (b_i - mean_i) / sigma_i`` (b = 0 if None)."""
    b = np.zeros(stats.n) if conv_bias is None \
        else finite_vector(conv_bias, "conv_bias", stats.n)
    return stats.beta + stats.gamma * (b - stats.mean) / stats.sigma


def _indices(idx: ArrayLike, n: int, name: str) -> np.ndarray:
    a = np.asarray(idx, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= n or np.unique(a).size != a.size):
        raise ValueError(f"{name} must be distinct channel indices in 0..{n - 1}")
    return a


def _split(kept: ArrayLike, pruned: ArrayLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    k, p = _indices(kept, n, "kept"), _indices(pruned, n, "pruned")
    if np.intersect1d(k, p).size:
        raise ValueError("kept and pruned channels overlap")
    return k, p


def eq12_pruning_loss(
    s: ArrayLike, F: ArrayLike, stats: ChannelStats, kept: ArrayLike, j: int,
    alpha1: float = 0.01,
) -> float:
    """Eq. 12: ``l_p(s) = ||vec(W_j) - sum_i s_i G_i||^2 + alpha1 (K_j - sum_i s_i K_i)^2``.

    ``G_i = (gamma_i sigma_j)/(sigma_i gamma_j) vec(W_i)`` (the paper's form, used when
    ``loss_weight`` is None). With a ``loss_weight`` (folded stats) the filter term is
    ``w_j ||R_j - sum_i s_i R_i||^2``. Raises ValueError where the loss is undefined.
    """
    f = np.asarray(F, dtype=np.float64).reshape(stats.n, -1)
    kept, s = _indices(kept, stats.n, "kept"), np.asarray(s, dtype=np.float64).ravel()
    k, g, sg = folded_bias(None, stats), stats.gamma, stats.sigma
    bias_term = alpha1 * (k[j] - s @ k[kept]) ** 2
    if stats.loss_weight is None:
        if g[j] == 0:
            raise ValueError("l_p is undefined for gamma_j == 0")
        G = f[kept] * ((g[kept] * sg[j]) / (sg[kept] * g[j]))[:, None]
        return float(np.sum((f[j] - s @ G) ** 2) + bias_term)
    w = stats.loss_weight[j]
    if not np.isfinite(w):
        raise ValueError("l_p is undefined for a channel with infinite loss weight")
    r = folded_filters(f, stats)
    return float(w * np.sum((r[j] - s @ r[kept]) ** 2) + bias_term)


@dataclass(frozen=True)
class PruningSolution:
    """Eq. 20 coefficients and diagnostics.

    ``coefficients[p, m]`` is ``s`` of pruned channel ``pruned[p]`` on kept channel
    ``kept[m]``. ``residual[p] = sqrt(l(s) / l(0))``: the loss left, relative to dropping the
    channel (0 = exact, 1 = nothing reconstructed). ``degenerate`` lists
    ``(pruned channel index, reason)`` with reason in ``zero_gamma`` / ``zero_filter``
    (``R_j = 0``: the pre-activation is the constant K_j, so coefficients are 0 rather than
    the paper's bias-matching minimiser; the caller may fold ``act(K_j) * Wn[:, j]`` into
    the next bias), ``no_kept``, ``single_kept``, ``singular_gram`` (the ridge is active).
    """

    coefficients: np.ndarray
    residual: np.ndarray
    degenerate: list[tuple[int, str]]
    kept: np.ndarray
    pruned: np.ndarray


def eq20_pruning_coefficients(
    F: ArrayLike, stats: ChannelStats, kept: ArrayLike, pruned: ArrayLike,
    alpha1: float = 0.01, ridge: float = 1e-8,
) -> PruningSolution:
    """Eq. 20: ``s = (Q^T Q + alpha1 P^T P)^-1 (Q^T V + alpha1 P^T K_j)`` per pruned channel.

    In BN-scaled form (``Q^T Q = w_j A``, ``A = R_kept R_kept^T``, ``w_j`` =
    :meth:`ChannelStats.pruning_weights`) this is
    ``(A + rho I + c_j k k^T) s = R_kept R_j + c_j K_j k`` with ``c_j = alpha1 / w_j`` and
    ``k = K_kept``. ``rho = ridge * trace(A) / |kept|`` (``ridge`` alone if A = 0) is a tiny
    relative Tikhonov term, always on so that singular Grams (duplicated filters, more kept
    channels than filter entries) give the minimum-norm-like solution; it perturbs a
    well-conditioned solution by ~``ridge * cond``. ``A + rho I`` is eigendecomposed once per
    layer and the rank-1 bias term is added by Sherman-Morrison, whose denominator
    ``1 + c_j k^T (A + rho I)^-1 k`` is >= 1: nothing divides by zero.
    """
    if not (np.isfinite(alpha1) and alpha1 >= 0):
        raise ValueError("alpha1 must be a finite number >= 0")
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError("ridge must be a finite number > 0")
    kept, pruned = _split(kept, pruned, stats.n)
    r = folded_filters(F, stats)
    if not np.all(np.isfinite(r)):
        raise ValueError("filters must be finite")
    kb, n_k = folded_bias(None, stats), kept.size
    sol = PruningSolution(np.zeros((pruned.size, n_k)), np.ones(pruned.size), [], kept, pruned)
    if n_k == 0 or pruned.size == 0:
        sol.degenerate.extend((int(j), "no_kept") for j in pruned)
        return sol
    w = stats.pruning_weights()[pruned]
    ok = np.isfinite(w) & np.any(r[pruned] != 0, axis=1)
    zero_gamma = (stats.gamma[pruned] == 0) & (stats.loss_weight is None)
    sol.degenerate.extend(
        (int(j), "zero_gamma" if zg else "zero_filter")
        for j, zg in zip(pruned[~ok], zero_gamma[~ok], strict=True)
    )
    rk, k = r[kept], kb[kept]
    a = rk @ rk.T
    tr = float(np.trace(a))
    rho = ridge * tr / n_k if tr > 0 else ridge
    evals, u = np.linalg.eigh(a)
    lam = np.maximum(evals, 0.0) + rho
    reason = "single_kept" if n_k == 1 else "singular_gram" if evals.min() < rho else ""
    sol.degenerate.extend((int(j), reason) for j in pruned[ok] if reason)
    if not ok.any():
        return sol
    po = pruned[ok]
    c = alpha1 / w[ok]

    def solve(b: np.ndarray) -> np.ndarray:
        return u @ ((u.T @ b) / (lam[:, None] if b.ndim == 2 else lam))

    z = solve(rk @ r[po].T) + np.outer(solve(k), c * kb[po])
    ak = solve(k)
    s = z - np.outer(ak, c * (k @ z) / (1.0 + c * (k @ ak)))
    sol.coefficients[ok] = s.T
    num = w[ok] * np.sum((r[po] - s.T @ rk) ** 2, axis=1) + alpha1 * (kb[po] - s.T @ k) ** 2
    den = w[ok] * np.sum(r[po] ** 2, axis=1) + alpha1 * kb[po] ** 2
    sol.residual[ok] = np.sqrt(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    return sol


def _as3d(wn: ArrayLike) -> tuple[np.ndarray, bool]:
    a = np.asarray(wn)
    if a.ndim not in (2, 3):
        raise ValueError(f"next-layer weight must be [O, N, r] or [O, N], got shape {a.shape}")
    return (a[:, :, None], True) if a.ndim == 2 else (a, False)


def _out(result: np.ndarray, like: np.ndarray, squeeze: bool) -> np.ndarray:
    dt = like.dtype if np.issubdtype(like.dtype, np.floating) else np.dtype(np.float64)
    return (result[:, :, 0] if squeeze else result).astype(dt)


def eq8_apply_pruning(
    Wn: ArrayLike, kept: ArrayLike, pruned: ArrayLike, coefficients: ArrayLike
) -> np.ndarray:
    """Eq. 8: ``W'[:, i] += sum_j s_ji W'[:, j]`` for kept i, then keep only ``kept`` columns.

    Returns ``[O, len(kept), r]`` (or ``[O, len(kept)]``), columns in ``kept`` order; channels
    in neither list are dropped without compensation.
    """
    w3, sq = _as3d(Wn)
    kept, pruned = _split(kept, pruned, w3.shape[1])
    c = np.asarray(coefficients, dtype=np.float64).reshape(pruned.size, kept.size)
    x = w3.astype(np.float64)
    new = x[:, kept] + np.einsum("pm,opr->omr", c, x[:, pruned])
    return _out(new, np.asarray(Wn), sq)


def eq14_21_quantization_scale(
    F: ArrayLike, Fq: ArrayLike, stats: ChannelStats, alpha2: float = 0.008
) -> np.ndarray:
    """Eq. 14/21 (METHOD.md's corrected form): one scale per quantized channel m.

    Loss ``l_q(s) = ||s Rq_m - R_m||^2 + alpha2 (s K_m - K_m)^2`` (``Rq_m = gamma_m/sigma_m
    vec(Wq_m)``, K unquantized); ``dl/ds = 0`` gives
    ``s~_m = (Rq_m . R_m + alpha2 K_m^2) / (Rq_m . Rq_m + alpha2 K_m^2)``; 1 where the
    denominator is 0 (nothing to rescale).
    """
    f = np.asarray(F, dtype=np.float64).reshape(stats.n, -1)
    fq = np.asarray(Fq, dtype=np.float64).reshape(stats.n, -1)
    g = (stats.gamma / stats.sigma)[:, None]
    dots, squares = np.empty(stats.n), np.empty(stats.n)
    # A few rows at a time: the BN-scaled rows (folded_filters' products) stay in cache
    # instead of two [N, D] float64 temporaries. Each row's products and sum are those of the
    # whole-matrix einsum (one row's reduction never reads another row).
    rows = max(1, _EQ14_CHUNK // max(1, f.shape[1]))
    for start in range(0, stats.n, rows):
        part = slice(start, start + rows)
        r, rq = f[part] * g[part], fq[part] * g[part]
        dots[part] = np.einsum("nd,nd->n", rq, r)
        squares[part] = np.einsum("nd,nd->n", rq, rq)
    k2 = alpha2 * folded_bias(None, stats) ** 2
    num = dots + k2
    den = squares + k2
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


_EQ14_CHUNK = 1 << 15  # elements per block of rows in Eq. 14 (256 KiB of float64)


def eq9_apply_quantization_scale(Wn: ArrayLike, scales: ArrayLike) -> np.ndarray:
    """Eq. 9: ``W'[:, m] *= s~_m`` on the input-channel axis."""
    w3, sq = _as3d(Wn)
    s = finite_vector(scales, "scales", w3.shape[1])
    return _out(w3.astype(np.float64) * s[None, :, None], np.asarray(Wn), sq)


def joint_next_layer_update(
    Wn: ArrayLike, kept: ArrayLike, pruned: ArrayLike, coefficients: ArrayLike,
    scales_kept: ArrayLike,
) -> np.ndarray:
    """Eq. 15-16 composition: ``W'[:, i] = s~_i (W'[:, i] + sum_j s_ij W'[:, j])``.

    ``scales_kept`` holds the Eq. 21 scale of each kept channel, in ``kept`` order.
    """
    return eq9_apply_quantization_scale(
        eq8_apply_pruning(Wn, kept, pruned, coefficients), scales_kept
    )


@dataclass(frozen=True)
class MergePairs:
    """Neuron Merging choice per pruned channel: ``targets`` (a kept channel index or -1),
    ``factors`` t (0 where -1), cosine ``similarity`` with the chosen candidate, and
    ``degenerate`` ``(pruned index, reason)``."""

    pruned: np.ndarray
    targets: np.ndarray
    factors: np.ndarray
    similarity: np.ndarray
    degenerate: list[tuple[int, str]]

    def coefficients(self, kept: ArrayLike) -> np.ndarray:
        """As an Eq. 8 coefficient matrix ``[len(pruned), len(kept)]``."""
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        out = np.zeros((self.pruned.size, kept.size))
        for p, (t, f) in enumerate(zip(self.targets, self.factors, strict=True)):
            if t >= 0:
                out[p, int(np.flatnonzero(kept == t)[0])] = f
        return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; zero rows give 0 like sklearn's pairwise_distances."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ua = np.divide(a, na[:, None], out=np.zeros_like(a), where=na[:, None] > 0)
    ub = np.divide(b, nb[:, None], out=np.zeros_like(b), where=nb[:, None] > 0)
    return ua @ ub.T


def neuron_merging_pairs(
    F: ArrayLike, stats: ChannelStats, kept: ArrayLike, pruned: ArrayLike,
    threshold: float | None = 0.1, lam: float = 0.85, factor: str = "released",
) -> MergePairs:
    """Neuron Merging (Kim et al., NeurIPS 2020) following their released ``decompose.py``.

    BN (``create_scaling_mat_conv_thres_bn``): for pruned c and each kept j, with raw filters,
    ``s = ||W_c||/||W_j||``, ``t = s (gamma_j/gamma_c)(var_c/var_j)`` (running variance, no eps,
    as released) and bias distance ``|(gamma_j/var_j)(s(mean_c - var_c beta_c/gamma_c) -
    mean_j) + beta_j| / t`` (their formula, not a plain beta difference), min-max normalised
    over c's kept candidates (all-equal: 0, where their code gives NaN). Score
    ``lam * cosine distance + (1 - lam) * bias``; the argmin is used only if its cosine
    similarity >= threshold (``None``/0 disables the check, as their ``if threshold``).
    ``factor="derived"`` uses ``t = s (gamma_c/gamma_j)(sigma_j/sigma_c)`` and bias
    ``|K_c - t K_j| / t`` instead, what a direction match actually needs. Candidates with
    zero filter, gamma or var are skipped.
    Identity/folded stats (``create_scaling_mat_ip_thres_bias``): rows ``[R_i, K_i]``,
    the most cosine-similar kept row, ``t = ||row_c|| / ||row_j||``.
    """
    if factor not in ("released", "derived"):
        raise ValueError("factor must be 'released' or 'derived'")
    kept, pruned = _split(kept, pruned, stats.n)
    n_p, bn = pruned.size, stats.kind == "batchnorm"
    f = np.asarray(F, dtype=np.float64).reshape(stats.n, -1)
    kb = folded_bias(None, stats)
    if not bn:  # NM's no-BN path appends the bias to each weight row
        f = np.hstack([folded_filters(f, stats), kb[:, None]])
    nrm, g, v = np.linalg.norm(f, axis=1), stats.gamma, stats.var
    if kept.size == 0:
        deg = [(int(c), "no_kept") for c in pruned]
        return MergePairs(pruned, np.full(n_p, -1), np.zeros(n_p), np.zeros(n_p), deg)
    cos = _cosine(f[pruned], f[kept])
    bad_c = (nrm[pruned] == 0) | (bn & ((g[pruned] == 0) | (v[pruned] == 0)))
    ok_j = (nrm[kept] > 0) & (not bn or ((g[kept] != 0) & (v[kept] != 0)))
    valid = ok_j[None, :] & ~bad_c[:, None]
    c_, j_ = (lambda a: a[pruned][:, None]), (lambda a: a[kept][None, :])
    # Invalid pairs may divide by zero here; they are masked out of the score below.
    with np.errstate(divide="ignore", invalid="ignore"):
        s, mu, be, sg = c_(nrm) / j_(nrm), stats.mean, stats.beta, stats.sigma
        if not bn:
            t, score = s, -cos
        elif factor == "released":
            t = s * (j_(g) / c_(g)) * (c_(v) / j_(v))
            b_in = s * (c_(mu) - c_(v) * c_(be) / c_(g)) - j_(mu)
            bias = np.abs((j_(g) / j_(v)) * b_in + j_(be)) / t
        else:
            t = s * (c_(g) / j_(g)) * (j_(sg) / c_(sg))
            bias = np.abs(c_(kb) - t * j_(kb)) / t
        if bn:
            lo = np.min(np.where(valid, bias, np.inf), axis=1, keepdims=True)
            span = np.max(np.where(valid, bias, -np.inf), axis=1, keepdims=True) - lo
            norm_b = np.where(span > 0, (bias - lo) / span, 0.0)
            score = lam * (1.0 - cos) + (1.0 - lam) * norm_b
    score = np.where(valid, score, np.inf)
    rows, best = np.arange(n_p), np.argmin(score, axis=1)
    has = np.isfinite(score[rows, best])
    sims = np.where(has, cos[rows, best], 0.0)
    merge = has & ~((sims < threshold) if threshold else np.zeros(n_p, dtype=bool))
    targets = np.where(merge, kept[best], -1)
    factors = np.where(merge, t[rows, best], 0.0)
    degenerate = [
        (int(c), ("zero_filter" if nrm[c] == 0 else "zero_gamma_or_var") if bad
         else "no_valid_candidate")
        for c, bad, h in zip(pruned, bad_c, has, strict=True) if bad or not h
    ]
    return MergePairs(pruned, targets, factors, sims, degenerate)


def apply_neuron_merging(
    Wn: ArrayLike, kept: ArrayLike, pruned: ArrayLike, pairs: MergePairs
) -> np.ndarray:
    """``W'[:, j] += t * W'[:, c]`` for each merged pair, then drop the pruned columns."""
    if not np.array_equal(pairs.pruned, np.asarray(pruned, dtype=np.int64).reshape(-1)):
        raise ValueError("pairs were computed for a different pruned list")
    return eq8_apply_pruning(Wn, kept, pruned, pairs.coefficients(kept))


def quantization_only_rtn(
    W: ArrayLike, bits: int, scheme: str = "paper", granularity: str = "tensor"
) -> np.ndarray:
    """Baseline: round-to-nearest fake quantization, no compensation."""
    return quantize(W, bits, scheme, granularity)


def udfc_quantization_compensation(
    W: ArrayLike, stats: ChannelStats, bits: int, scheme: str = "paper",
    granularity: str = "tensor", alpha2: float = 0.008,
) -> tuple[QuantResult, np.ndarray]:
    """Quantize layer l and return it with the Eq. 21 scales for layer l+1's input channels."""
    q = quantize_params(W, bits, scheme, granularity)
    return q, eq14_21_quantization_scale(W, q.dequantized, stats, alpha2)
