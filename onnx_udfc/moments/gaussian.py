"""Moments of activations of jointly Gaussian pre-activations (data-free activation model).

For ``z ~ N(mu, Sigma)`` and an elementwise activation ``f``, :func:`gaussian_moments` returns
``E[f(z)]`` and the centred covariance ``Cov(f(z_i), f(z_j))``. The cross terms use Mehler's
expansion of the bivariate normal density in normalised Hermite polynomials ``h_k``:

    E[f(z_i) f(z_j)] = sum_k rho_ij^k c_ik c_jk,   c_ik = E[f(mu_i + s_i u) h_k(u)],

with ``rho`` the correlation of ``z_i, z_j``. The diagonal is exact (closed form or 1-D
quadrature), and the part of each channel's variance beyond the truncation order is added to the
off-diagonal terms as ``rho^(K+1) sqrt(t_i t_j)``. ReLU, LeakyReLU and Clip/ReLU6 have closed-form
coefficients (Stein: ``E[g h_k] = E[g^(k)]/sqrt(k!)``, and the k-th derivative of a ReLU is a
derivative of a delta); smooth or other activations (SiLU, GELU, HardSwish, Sigmoid, Tanh) use
Gauss-Hermite quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from onnx_udfc.ops.activations import SMOOTH, Activation

ORDER = 16  # Hermite terms of the cross moments
NODES = 96  # quadrature nodes for activations without a closed form
SQRT2 = math.sqrt(2.0)


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _Phi(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr  # imported on use: it adds 0.1 s to every run's start

    return ndtr(np.asarray(x, dtype=float))


def _hermite_norm(x: np.ndarray, order: int) -> np.ndarray:
    """``h_k(x) = He_k(x)/sqrt(k!)`` for k < order, shape ``[order, *x.shape]`` (stable)."""
    h = np.empty((order, *np.shape(x)))
    h[0] = 1.0
    if order > 1:
        h[1] = x
    for k in range(1, order - 1):
        h[k + 1] = (x * h[k] - math.sqrt(k) * h[k - 1]) / math.sqrt(k + 1)
    return h


def relu_moments(mu: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ``E[relu(z)]`` and ``E[relu(z)^2]`` for ``z ~ N(mu, s^2)`` (s may be 0)."""
    mu, s = np.asarray(mu, float), np.asarray(s, float)
    safe = np.where(s > 0, s, 1.0)
    a = np.where(s > 0, mu / safe, np.where(mu >= 0, np.inf, -np.inf))
    big_phi, small_phi = _Phi(a), _phi(np.where(np.isfinite(a), a, 0.0)) * np.isfinite(a)
    m1 = mu * big_phi + s * small_phi
    m2 = (mu * mu + s * s) * big_phi + mu * s * small_phi
    return m1, m2


def _relu_coefficients(mu: np.ndarray, s: np.ndarray, order: int) -> np.ndarray:
    """``c_k = E[relu(mu + s u) h_k(u)]``: k=0 mean, k=1 ``s Phi(a)``, k>=2
    ``s phi(a) h_(k-2)(-a) / sqrt(k (k-1))`` with ``a = mu/s``."""
    a = mu / np.where(s > 0, s, 1.0)
    c = np.zeros((order, mu.size))
    c[0] = relu_moments(mu, s)[0]
    c[1] = s * _Phi(a)
    if order > 2:
        h = _hermite_norm(-a, order - 2)
        k = np.arange(2, order)[:, None]
        c[2:] = s * _phi(a) * h / np.sqrt(k * (k - 1.0))
    return c


def _coefficients(mu: np.ndarray, s: np.ndarray, act: Activation,
                  order: int) -> tuple[np.ndarray, np.ndarray]:
    """Hermite coefficients ``[order, N]`` and the exact second moments ``E[f(z)^2]``."""
    if act.kind == "identity":
        c = np.zeros((order, mu.size))
        c[0], c[1] = mu, s
        return c, mu * mu + s * s
    if act.kind == "relu":
        return _relu_coefficients(mu, s, order), relu_moments(mu, s)[1]
    if act.kind == "leaky":  # alpha z + (1 - alpha) relu(z)
        lin, _ = _coefficients(mu, s, Activation("identity"), order)
        rel = _relu_coefficients(mu, s, order)
        c = act.alpha * lin + (1.0 - act.alpha) * rel
        r2 = relu_moments(mu, s)[1]
        a = act.alpha
        # E[(a z + (1-a) r)^2] with E[z r] = E[r^2] (r (z - r) = 0)
        return c, a * a * (mu * mu + s * s) + (1 - a * a) * r2
    if act.kind == "clip" and not (np.isfinite(act.lo) and np.isfinite(act.hi)):
        lo, hi = act.lo, act.hi
        return _quadrature(mu, s, lambda x: np.clip(x, lo, hi), order)
    if act.kind == "clip":  # lo + relu(z - lo) - relu(z - hi)
        c1 = _relu_coefficients(mu - act.lo, s, order)
        c2 = _relu_coefficients(mu - act.hi, s, order)
        c = c1 - c2
        c[0] += act.lo
        x, w = hermegauss(NODES * 2)
        w = w / w.sum()
        vals = np.clip(mu[None, :] + s[None, :] * x[:, None], act.lo, act.hi)
        m2 = w @ (vals * vals)
        return c, m2
    f = SMOOTH.get(act.kind)
    if f is None:
        raise ValueError(f"unknown activation kind '{act.kind}'")
    return _quadrature(mu, s, f, order)


def _quadrature(mu: np.ndarray, s: np.ndarray, f: Callable[[np.ndarray], np.ndarray],
                order: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = hermegauss(NODES)
    w = w / w.sum()
    vals = f(mu[None, :] + s[None, :] * x[:, None])  # [nodes, N]
    h = _hermite_norm(x, order)  # [order, nodes]
    return (h * w) @ vals, w @ (vals * vals)


def gaussian_variances(mu: np.ndarray, var: np.ndarray,
                       act: Activation) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[N]`` and variance ``[N]`` of ``f(z_i)``, ``z_i ~ N(mu_i, var_i)`` (the diagonal
    of :func:`gaussian_moments`, without the cross terms)."""
    mu = np.asarray(mu, float).reshape(-1)
    s = np.sqrt(np.clip(np.asarray(var, float).reshape(-1), 0.0, None))
    c, m2 = _coefficients(mu, s, act, 2)
    return c[0], np.clip(m2 - c[0] * c[0], 0.0, None)


def gaussian_moments(mu: np.ndarray, cov: np.ndarray, act: Activation,
                     order: int = ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[N]`` and centred covariance ``[N, N]`` of ``f(z)``, ``z ~ N(mu, cov)``."""
    mu = np.asarray(mu, float).reshape(-1)
    if np.ndim(cov) == 1:  # a diagonal given as its vector: variances in, variances out
        return gaussian_variances(mu, cov, act)
    cov = np.asarray(cov, float).reshape(mu.size, mu.size)
    var = np.clip(np.diag(cov), 0.0, None)
    s = np.sqrt(var)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    rho = np.clip(cov * inv[:, None] * inv[None, :], -1.0, 1.0)
    c, m2 = _coefficients(mu, s, act, order)
    mean = c[0]
    if not np.any(rho - np.diag(np.diag(rho))):  # uncorrelated: the variances only
        return mean, np.diag(np.clip(m2 - mean * mean, 0.0, None))
    out = np.zeros_like(rho)
    power = np.ones_like(rho)
    tmp = np.empty_like(rho)
    for k in range(1, order):
        power *= rho
        np.multiply(power, np.outer(c[k], c[k]), out=tmp)
        out += tmp
    tail = np.clip(m2 - mean * mean - np.sum(c[1:] ** 2, axis=0), 0.0, None)
    out += (power * rho) * np.sqrt(np.outer(tail, tail))
    np.fill_diagonal(out, np.clip(m2 - mean * mean, 0.0, None))
    return mean, out
