"""Least-squares reconstruction of some channels from the others, read off their moments.

A pruned channel ``x_j`` is replaced by ``sum_i s_i x_i + c_j`` over the kept channels K:
``s = (C_KK + lam * mean(diag C_KK) I)^-1 C_Kj`` and ``c_j = E[x_j] - s . E[x_K]`` (C: the
centred covariance). udfc+ folds it into the next layers; the FLOPs budget and the ``recon``
criterion rank channels by what it leaves unexplained.
"""

from __future__ import annotations

import numpy as np

from onnx_udfc.moments.propagated import TensorMoments

RIDGE = 0.01  # relative to the mean kept variance (tuned on NM ResNet-56 and LeNet-300-100)


def reconstruction(m: TensorMoments, kept: np.ndarray, pruned: np.ndarray,
                   lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coefficients [|P|, |K|], constants [|P|], relative residual variance [|P|])``."""
    c = m.full
    ckk = c[np.ix_(kept, kept)]
    ckj = c[np.ix_(kept, pruned)]
    d = float(np.mean(np.diag(ckk))) if kept.size else 0.0
    reg = ckk + (lam * d + 1e-12 * max(d, 1e-30)) * np.eye(kept.size)
    s = np.linalg.solve(reg, ckj) if kept.size else np.zeros((0, pruned.size))
    const = m.mean[pruned] - s.T @ m.mean[kept]
    vj = np.diag(c)[pruned]
    res = vj - 2 * np.einsum("kp,kp->p", s, ckj) + np.einsum("kp,kp->p", ckk @ s, s)
    rel = np.divide(res, vj, out=np.zeros_like(vj), where=vj > 0)
    return s.T, const, np.clip(rel, 0.0, None)
