"""The Gaussian activation-moment model against Monte Carlo (seeded, tolerances that fail)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_udfc.moments.gaussian import SMOOTH, Activation, gaussian_moments, relu_moments

N_SAMPLES = 400_000


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, 4))
    a[1] = a[0] + 0.2 * rng.normal(size=4)  # a highly correlated pair
    cov = a @ a.T / 4 + 0.01 * np.eye(4)
    mu = rng.normal(size=4) * 0.8
    z = rng.multivariate_normal(mu, cov, size=N_SAMPLES)
    return mu, cov, z


def _apply(act: Activation, z: np.ndarray) -> np.ndarray:
    if act.kind == "relu":
        return np.maximum(z, 0)
    if act.kind == "leaky":
        return np.where(z > 0, z, act.alpha * z)
    if act.kind == "clip":
        return np.clip(z, act.lo, act.hi)
    return SMOOTH[act.kind](z)


ACTS = [Activation("relu"), Activation("leaky", alpha=0.1), Activation("clip", lo=0.0, hi=1.0),
        Activation("clip", lo=-np.inf, hi=0.5), Activation("silu"), Activation("gelu"),
        Activation("hardswish")]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{a.kind}")
def test_moments_match_monte_carlo(act):
    mu, cov, z = _problem()
    mean, c = gaussian_moments(mu, cov, act)
    y = _apply(act, z)
    scale = np.abs(np.cov(y.T)).max()
    assert np.abs(mean - y.mean(0)).max() < 0.01 * max(scale, 1e-3) ** 0.5 + 3e-3
    assert np.abs(c - np.cov(y.T)).max() < 0.01 * scale + 2e-3


def test_tolerance_can_fail():
    mu, cov, z = _problem()
    flipped = cov.copy()
    flipped[0, 2] = flipped[2, 0] = -cov[0, 2]
    _, c = gaussian_moments(mu, flipped, Activation("relu"))
    y = np.maximum(z, 0)
    assert np.abs(c - np.cov(y.T)).max() > 0.01 * np.abs(np.cov(y.T)).max() + 2e-3


def test_relu_closed_form_limits():
    m1, m2 = relu_moments(np.array([0.0, 5.0, -5.0, 1.0]), np.array([1.0, 1e-9, 1.0, 0.0]))
    assert m1[0] == pytest.approx(1 / np.sqrt(2 * np.pi))
    assert m2[0] == pytest.approx(0.5)
    assert m1[1] == pytest.approx(5.0) and m2[1] == pytest.approx(25.0)
    assert m1[2] < 1e-5
    assert m1[3] == pytest.approx(1.0) and m2[3] == pytest.approx(1.0)


def test_perfectly_correlated_pair_is_exact():
    mu = np.array([0.3, 0.3])
    cov = np.array([[1.0, 1.0], [1.0, 1.0]])
    mean, c = gaussian_moments(mu, cov, Activation("relu"))
    assert c[0, 1] == pytest.approx(c[0, 0], rel=1e-9)
    assert mean[0] == pytest.approx(mean[1])
