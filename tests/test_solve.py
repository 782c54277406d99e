"""Tests of the compensation mathematics (methods.equations) against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar

from onnx_udfc.methods.equations import (
    ChannelStats,
    MergePairs,
    apply_neuron_merging,
    eq8_apply_pruning,
    eq9_apply_quantization_scale,
    eq12_pruning_loss,
    eq14_21_quantization_scale,
    eq20_pruning_coefficients,
    folded_bias,
    folded_filters,
    joint_next_layer_update,
    neuron_merging_pairs,
    quantization_only_rtn,
    udfc_quantization_compensation,
)
from onnx_udfc.quant.grids import paper_quantize, quantize_params

N, SHAPE = 12, (4, 2, 2)  # 12 channels, filters of 16 entries
KEPT = np.array([0, 2, 3, 5, 6, 8, 9, 11])
PRUNED = np.array([10, 1, 4, 7])


def _bn(rng: np.random.Generator, n: int = N, positive: bool = False) -> ChannelStats:
    sign = 1.0 if positive else rng.choice([-1.0, 1.0], n)
    return ChannelStats.from_batchnorm(
        gamma=sign * rng.uniform(0.3, 2.0, n),
        beta=0.5 * rng.standard_normal(n),
        mean=0.3 * rng.standard_normal(n),
        var=rng.uniform(0.2, 2.0, n),
        eps=1e-5,
    )


def _case(kind: str, seed: int = 0) -> tuple[np.ndarray, ChannelStats]:
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((N, *SHAPE)) * rng.uniform(0.2, 3.0, N)[:, None, None, None]
    if kind == "bn":
        return f, _bn(rng)
    bias = 0.7 * rng.standard_normal(N)
    if kind == "identity":
        return f, ChannelStats.identity(bias)
    if kind == "folded_array":
        return f, ChannelStats.folded(bias, f, rng.uniform(0.1, 5.0, N))
    return f, ChannelStats.folded(bias, f, kind.removeprefix("folded_"))


KINDS = ("bn", "identity", "folded_relative", "folded_unit", "folded_layer", "folded_array")


def _bfgs(f: np.ndarray, stats: ChannelStats, kept, j: int, alpha1: float) -> np.ndarray:
    res = minimize(
        eq12_pruning_loss, np.zeros(len(kept)), args=(f, stats, kept, j, alpha1),
        method="BFGS", options={"gtol": 1e-11, "maxiter": 20000},
    )
    return res.x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha1", (0.01, 0.5))
def test_eq20_is_the_minimum_of_eq12(kind: str, alpha1: float) -> None:
    f, stats = _case(kind, seed=len(kind))
    sol = eq20_pruning_coefficients(f, stats, KEPT, PRUNED, alpha1=alpha1)
    assert sol.coefficients.shape == (len(PRUNED), len(KEPT))
    assert sol.degenerate == []
    for p, j in enumerate(PRUNED):
        s_ref = _bfgs(f, stats, KEPT, int(j), alpha1)
        s = sol.coefficients[p]
        assert np.linalg.norm(s - s_ref) <= 1e-5 * max(1.0, np.linalg.norm(s_ref))
        loss = eq12_pruning_loss(s, f, stats, KEPT, int(j), alpha1)
        assert loss <= eq12_pruning_loss(s_ref, f, stats, KEPT, int(j), alpha1) * (1 + 1e-9)
        loss0 = eq12_pruning_loss(np.zeros(len(KEPT)), f, stats, KEPT, int(j), alpha1)
        assert sol.residual[p] == pytest.approx(np.sqrt(loss / loss0), rel=1e-6)


def test_eq20_changes_with_alpha1() -> None:
    # Guards against the bias term being silently ignored.
    f, stats = _case("bn")
    a = eq20_pruning_coefficients(f, stats, KEPT, PRUNED, alpha1=0.0).coefficients
    b = eq20_pruning_coefficients(f, stats, KEPT, PRUNED, alpha1=1.0).coefficients
    assert np.abs(a - b).max() > 1e-3


def _activations(r: np.ndarray, k: np.ndarray, seed: int, spatial: int = 3) -> np.ndarray:
    """Post-ReLU outputs ``relu(R x + K)`` for random inputs, shape [N, spatial, samples]."""
    x = np.random.default_rng(seed).standard_normal((r.shape[1], spatial, 200))
    return np.maximum(np.einsum("nd,drt->nrt", r, x) + k[:, None, None], 0.0)


def _layer_with_multiples(kind: str, seed: int) -> tuple[np.ndarray, ChannelStats, dict]:
    """Pruned channels whose (R, K) are exact positive multiples of kept ones."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((N, 16))
    k = 0.5 * rng.standard_normal(N)
    plan = {10: (3, 1.7), 1: (3, 0.4), 4: (8, 2.5), 7: (0, 0.9)}  # pruned: (kept, factor)
    for j, (i, c) in plan.items():
        r[j], k[j] = c * r[i], c * k[i]
    if kind == "identity":
        return r, ChannelStats.identity(k), plan
    if kind == "folded":
        return r, ChannelStats.folded(k, r, "relative"), plan
    bn = _bn(rng)
    scale = bn.gamma / bn.sigma
    beta = k + bn.gamma * bn.mean / bn.sigma
    stats = ChannelStats.from_batchnorm(bn.gamma, beta, bn.mean, bn.var, bn.eps)
    return r / scale[:, None], stats, plan


@pytest.mark.parametrize("kind", ("bn", "identity", "folded"))
def test_exact_multiples_are_reconstructed_exactly(kind: str) -> None:
    f, stats, plan = _layer_with_multiples(kind, seed=3)
    r, k = folded_filters(f, stats), folded_bias(None, stats)
    sol = eq20_pruning_coefficients(f, stats, KEPT, PRUNED, alpha1=0.01)
    expected = np.zeros((len(PRUNED), len(KEPT)))
    for p, j in enumerate(PRUNED):
        i, c = plan[int(j)]
        expected[p, np.flatnonzero(KEPT == i)[0]] = c
    np.testing.assert_allclose(sol.coefficients, expected, rtol=0, atol=1e-6)
    assert sol.residual.max() < 1e-6
    wn = np.random.default_rng(4).standard_normal((5, N, 3))
    act = _activations(r, k, seed=5)
    out = np.einsum("onr,nrt->ot", wn, act)
    wn2 = eq8_apply_pruning(wn, KEPT, PRUNED, sol.coefficients)
    assert wn2.shape == (5, len(KEPT), 3)
    out2 = np.einsum("omr,mrt->ot", wn2, act[KEPT])
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6 * np.abs(out).max())
    # Dropping the channels without compensation is visibly worse.
    out_drop = np.einsum("omr,mrt->ot", wn[:, KEPT], act[KEPT])
    assert np.abs(out_drop - out).max() > 0.1 * np.abs(out).max()


def test_eq8_matches_a_loop_and_leaves_input_alone() -> None:
    rng = np.random.default_rng(6)
    wn = rng.standard_normal((4, N, 9)).astype(np.float32)
    before = wn.copy()
    coef = rng.standard_normal((len(PRUNED), len(KEPT)))
    ref = wn[:, KEPT].astype(np.float64)
    for p, j in enumerate(PRUNED):
        for m in range(len(KEPT)):
            ref[:, m] += coef[p, m] * wn[:, j]
    out = eq8_apply_pruning(wn, KEPT, PRUNED, coef)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(wn, before)
    out2d = eq8_apply_pruning(wn[:, :, 0], KEPT, PRUNED, coef)
    np.testing.assert_allclose(out2d, ref[:, :, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        eq8_apply_pruning(wn, [0, 1], [1, 2], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="distinct channel indices"):
        eq8_apply_pruning(wn, [0, N], [1], np.zeros((1, 2)))


def _stats_like(stats: ChannelStats, **changes: np.ndarray) -> ChannelStats:
    fields = {"gamma": stats.gamma, "beta": stats.beta, "mean": stats.mean, "var": stats.var}
    fields.update(changes)
    return ChannelStats(**fields, eps=stats.eps)


def test_zero_gamma_is_reported_and_zeroed() -> None:
    f, stats = _case("bn")
    gamma = stats.gamma.copy()
    gamma[PRUNED[1]] = 0.0
    st0 = _stats_like(stats, gamma=gamma)
    with np.errstate(divide="raise", invalid="raise"):
        sol = eq20_pruning_coefficients(f, st0, KEPT, PRUNED)
    assert (int(PRUNED[1]), "zero_gamma") in sol.degenerate
    assert np.all(sol.coefficients[1] == 0.0) and np.all(np.isfinite(sol.coefficients))
    ref = eq20_pruning_coefficients(f, stats, KEPT, PRUNED).coefficients
    np.testing.assert_allclose(sol.coefficients[[0, 2, 3]], ref[[0, 2, 3]], rtol=1e-10)
    with pytest.raises(ValueError, match="gamma_j == 0"):
        eq12_pruning_loss(np.zeros(len(KEPT)), f, st0, KEPT, int(PRUNED[1]))


def test_zero_raw_filter_with_bn_is_a_constant_channel() -> None:
    f, stats = _case("bn", seed=22)
    f[PRUNED[2]] = 0.0
    with np.errstate(divide="raise", invalid="raise"):
        sol = eq20_pruning_coefficients(f, stats, KEPT, PRUNED)
    assert sol.degenerate == [(int(PRUNED[2]), "zero_filter")]
    assert np.all(sol.coefficients[2] == 0.0) and sol.residual[2] == 1.0


def _lstsq_min_loss(f, stats, kept, j, alpha1) -> float:
    """Minimum of the BN-form loss from a stacked least-squares problem (reference)."""
    r, k = folded_filters(f, stats), folded_bias(None, stats)
    w = stats.pruning_weights()[j]
    a = np.vstack([np.sqrt(w) * r[kept].T, np.sqrt(alpha1) * k[kept][None, :]])
    b = np.concatenate([np.sqrt(w) * r[j], [np.sqrt(alpha1) * k[j]]])
    s = np.linalg.lstsq(a, b, rcond=None)[0]
    return float(np.sum((a @ s - b) ** 2))


def test_duplicated_kept_filters_singular_gram() -> None:
    f, stats = _case("bn", seed=7)
    f[5] = f[2]
    fields = {name: getattr(stats, name).copy() for name in ("gamma", "beta", "mean", "var")}
    for arr in fields.values():
        arr[5] = arr[2]
    st = _stats_like(stats, **fields)
    with np.errstate(divide="raise", invalid="raise"):
        sol = eq20_pruning_coefficients(f, st, KEPT, PRUNED)
    assert all(reason == "singular_gram" for _, reason in sol.degenerate)
    assert {j for j, _ in sol.degenerate} == set(PRUNED.tolist())
    assert np.all(np.isfinite(sol.coefficients))
    i2, i5 = np.flatnonzero(KEPT == 2)[0], np.flatnonzero(KEPT == 5)[0]
    np.testing.assert_allclose(sol.coefficients[:, i2], sol.coefficients[:, i5], rtol=1e-6)
    for p, j in enumerate(PRUNED):
        best = _lstsq_min_loss(f, st, KEPT, int(j), 0.01)
        got = eq12_pruning_loss(sol.coefficients[p], f, st, KEPT, int(j), 0.01)
        assert got <= best + 1e-6 * max(best, 1.0)


def test_more_kept_channels_than_filter_entries() -> None:
    rng = np.random.default_rng(8)
    f, stats = rng.standard_normal((N, 3)), _bn(rng)
    sol = eq20_pruning_coefficients(f, stats, KEPT, PRUNED)
    assert {reason for _, reason in sol.degenerate} == {"singular_gram"}
    assert np.all(np.isfinite(sol.coefficients)) and np.abs(sol.coefficients).max() < 1e3
    for p, j in enumerate(PRUNED):
        best = _lstsq_min_loss(f, stats, KEPT, int(j), 0.01)
        got = eq12_pruning_loss(sol.coefficients[p], f, stats, KEPT, int(j), 0.01)
        assert got <= best + 1e-6


def test_single_and_no_kept_channel() -> None:
    f, stats = _case("bn", seed=9)
    sol = eq20_pruning_coefficients(f, stats, [3], [1, 4])
    assert sol.coefficients.shape == (2, 1)
    assert sol.degenerate == [(1, "single_kept"), (4, "single_kept")]
    r, k, w = folded_filters(f, stats), folded_bias(None, stats), stats.pruning_weights()
    for p, j in enumerate((1, 4)):
        s = (w[j] * r[3] @ r[j] + 0.01 * k[3] * k[j]) / (w[j] * r[3] @ r[3] + 0.01 * k[3] ** 2)
        assert sol.coefficients[p, 0] == pytest.approx(s, rel=1e-6)
    none = eq20_pruning_coefficients(f, stats, [], [1, 4])
    assert none.coefficients.shape == (2, 0)
    assert none.degenerate == [(1, "no_kept"), (4, "no_kept")]
    empty = eq20_pruning_coefficients(f, stats, KEPT, [])
    assert empty.coefficients.shape == (0, len(KEPT)) and empty.degenerate == []


def test_folded_zero_filter_and_all_zero_kept() -> None:
    rng = np.random.default_rng(10)
    r, k = rng.standard_normal((N, 16)), rng.standard_normal(N)
    r[PRUNED[0]] = 0.0
    with np.errstate(divide="raise", invalid="raise"):
        sol = eq20_pruning_coefficients(r, ChannelStats.folded(k, r), KEPT, PRUNED)
        assert sol.degenerate == [(int(PRUNED[0]), "zero_filter")]
        assert np.all(sol.coefficients[0] == 0.0)
        r[KEPT] = 0.0
        sol = eq20_pruning_coefficients(r, ChannelStats.folded(k, r, "unit"), KEPT, PRUNED)
    assert np.all(np.isfinite(sol.coefficients))


def test_folded_weighting_choices_against_bn() -> None:
    rng = np.random.default_rng(11)
    raw = rng.standard_normal((N, 16))
    bn = _bn(rng)
    unit_raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    for w_raw, relative_matches in ((unit_raw, True), (raw, False)):
        ref = eq20_pruning_coefficients(w_raw, bn, KEPT, PRUNED).coefficients
        r, k = folded_filters(w_raw, bn), folded_bias(None, bn)
        got = {
            name: eq20_pruning_coefficients(r, ChannelStats.folded(k, r, name), KEPT, PRUNED)
            for name in ("relative", "unit", "layer")
        }
        exact = ChannelStats.folded(k, r, (bn.sigma / bn.gamma) ** 2)
        np.testing.assert_allclose(
            eq20_pruning_coefficients(r, exact, KEPT, PRUNED).coefficients, ref, atol=1e-8
        )
        close = np.allclose(got["relative"].coefficients, ref, atol=1e-8)
        assert close == relative_matches
        assert not np.allclose(got["unit"].coefficients, ref, atol=1e-4)
    # "unit" makes the loss homogeneous: scaling pruned channel j scales its coefficients.
    r, k = rng.standard_normal((N, 16)), rng.standard_normal(N)
    base = eq20_pruning_coefficients(r, ChannelStats.folded(k, r, "unit"), KEPT, PRUNED)
    r2, k2 = r.copy(), k.copy()
    r2[PRUNED[0]] *= 3.0
    k2[PRUNED[0]] *= 3.0
    scaled = eq20_pruning_coefficients(r2, ChannelStats.folded(k2, r2, "unit"), KEPT, PRUNED)
    np.testing.assert_allclose(scaled.coefficients[0], 3.0 * base.coefficients[0], rtol=1e-8)


@pytest.mark.parametrize("kind", ("bn", "identity", "folded_relative"))
@pytest.mark.parametrize("bits", (2, 4))
def test_eq21_is_the_minimiser_of_its_loss(kind: str, bits: int) -> None:
    f, stats = _case(kind, seed=12)
    fq = paper_quantize(f, bits)
    scales = eq14_21_quantization_scale(f, fq, stats, alpha2=0.008)
    g, sig = stats.gamma, np.sqrt(stats.var + stats.eps)
    r = (g / sig)[:, None] * f.reshape(N, -1)
    rq = (g / sig)[:, None] * fq.reshape(N, -1)
    k = stats.beta - g * stats.mean / sig
    for m in range(N):
        def loss(s: float, m: int = m) -> float:
            return float(np.sum((s * rq[m] - r[m]) ** 2) + 0.008 * (s * k[m] - k[m]) ** 2)

        ref = minimize_scalar(loss, bracket=(0.0, 2.0), options={"xtol": 1e-12}).x
        assert scales[m] == pytest.approx(ref, rel=1e-6)
    assert np.abs(scales - 1.0).max() > 1e-3


def test_eq21_special_cases() -> None:
    f, stats = _case("bn", seed=13)
    np.testing.assert_allclose(eq14_21_quantization_scale(f, f, stats), 1.0, rtol=1e-12)
    zero_bias = ChannelStats.from_batchnorm(stats.gamma, np.zeros(N), np.zeros(N), stats.var)
    np.testing.assert_allclose(eq14_21_quantization_scale(f, f / 2, zero_bias), 2.0, rtol=1e-12)
    f0 = f.copy()
    f0[3] = 0.0
    ident = ChannelStats.identity(np.zeros(N))
    with np.errstate(divide="raise", invalid="raise"):
        s = eq14_21_quantization_scale(f0, f0 * 0, ident)
        assert s[3] == 1.0 and np.all(np.isfinite(s))
        gamma = stats.gamma.copy()
        gamma[2] = 0.0
        s = eq14_21_quantization_scale(f, f / 2, _stats_like(stats, gamma=gamma))
    assert s[2] == 1.0


def test_eq9_joint_and_convenience() -> None:
    rng = np.random.default_rng(14)
    wn = rng.standard_normal((3, N, 4))
    coef = rng.standard_normal((len(PRUNED), len(KEPT)))
    scales = rng.uniform(0.5, 1.5, len(KEPT))
    joint = joint_next_layer_update(wn, KEPT, PRUNED, coef, scales)
    ref = np.empty((3, len(KEPT), 4))
    for m, i in enumerate(KEPT):
        col = wn[:, i] + sum(coef[p, m] * wn[:, j] for p, j in enumerate(PRUNED))
        ref[:, m] = scales[m] * col
    np.testing.assert_allclose(joint, ref, rtol=1e-12)
    full = rng.uniform(0.5, 1.5, N)
    np.testing.assert_allclose(eq9_apply_quantization_scale(wn, full), wn * full[None, :, None])
    f, stats = _case("bn", seed=15)
    q, s = udfc_quantization_compensation(f, stats, 3, "symmetric", "channel")
    np.testing.assert_array_equal(q.dequantized, quantize_params(f, 3, "symmetric", "channel")
                                  .dequantized)
    np.testing.assert_allclose(s, eq14_21_quantization_scale(f, q.dequantized, stats))
    np.testing.assert_array_equal(quantization_only_rtn(f, 3), paper_quantize(f, 3))


# --- Neuron Merging -------------------------------------------------------------------------


def _nm_literal(w, kept, pruned, gamma, beta, mean, var, threshold=0.1, lam=0.85):
    """Line-by-line port of create_scaling_mat_conv_thres_bn (friendshipkim/neuron-merging)."""
    w = w.reshape(w.shape[0], -1)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cosine_dist = 1 - unit @ unit.T
    out = {}
    for i in pruned:
        cos_list, scale_list, bias_list = [], [], []
        for c in kept:
            s = np.linalg.norm(w[i]) / np.linalg.norm(w[c])
            scale = s * (gamma[c] / gamma[i]) * (var[i] / var[c])
            bias = abs((gamma[c] / var[c]) * (s * (-(var[i] * beta[i] / gamma[i]) + mean[i])
                                               - mean[c]) + beta[c]) / scale
            cos_list.append(cosine_dist[i, c])
            scale_list.append(scale)
            bias_list.append(bias)
        b = np.array(bias_list)
        b = (b - b.min()) / (b.max() - b.min())
        score = lam * np.array(cos_list) + (1 - lam) * b
        k = int(np.argmin(score))
        if threshold and 1 - cos_list[k] < threshold:
            out[int(i)] = (-1, 0.0)
        else:
            out[int(i)] = (int(kept[k]), scale_list[k])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_nm_matches_released_code(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((N, 4))  # few entries: similarities spread around the threshold
    st = _bn(rng, positive=True)
    pairs = neuron_merging_pairs(f, st, KEPT, PRUNED)
    ref = _nm_literal(f, KEPT, PRUNED, st.gamma, st.beta, st.mean, st.var)
    for p, j in enumerate(PRUNED):
        assert pairs.targets[p] == ref[int(j)][0]
        assert pairs.factors[p] == pytest.approx(ref[int(j)][1], rel=1e-12)


def test_nm_same_direction_and_threshold() -> None:
    rng = np.random.default_rng(16)
    f = rng.standard_normal((N, 64))
    f[:, -1] = 0.0
    f[10] = 1.7 * f[3]
    f[1] = 0.0
    f[1, -1] = 1.0  # orthogonal to every kept filter
    st = _bn(rng, positive=True)
    pairs = neuron_merging_pairs(f, st, KEPT, PRUNED)
    g, v = st.gamma, st.var
    assert pairs.targets[0] == 3 and pairs.similarity[0] == pytest.approx(1.0)
    assert pairs.factors[0] == pytest.approx(1.7 * (g[3] / g[10]) * (v[10] / v[3]), rel=1e-12)
    assert pairs.targets[1] == -1 and pairs.factors[1] == 0.0
    assert neuron_merging_pairs(f, st, KEPT, PRUNED, threshold=None).targets[1] >= 0
    coef = pairs.coefficients(KEPT)
    assert coef[0, np.flatnonzero(KEPT == 3)[0]] == pairs.factors[0]
    assert np.count_nonzero(coef[1]) == 0


def _check_merge_exact(f, stats, pairs: MergePairs) -> None:
    r, k = folded_filters(f, stats), folded_bias(None, stats)
    act = _activations(r, k, seed=17, spatial=1)
    wn = np.random.default_rng(18).standard_normal((4, N, 1))
    wn2 = apply_neuron_merging(wn, KEPT, [10], pairs)
    out = np.einsum("onr,nrt->ot", wn[:, np.r_[KEPT, 10]], act[np.r_[KEPT, 10]])
    np.testing.assert_allclose(np.einsum("omr,mrt->ot", wn2, act[KEPT]), out, rtol=1e-9)


def test_nm_derived_factor_is_exact_under_relu() -> None:
    rng = np.random.default_rng(19)
    f, st = rng.standard_normal((N, 32)), _bn(rng, positive=True)
    f[10] = 2.3 * f[5]
    t = 2.3 * (st.gamma[10] / st.gamma[5]) * (st.sigma[5] / st.sigma[10])
    beta = st.beta.copy()
    beta[10] += t * folded_bias(None, st)[5] - folded_bias(None, st)[10]
    st = _stats_like(st, beta=beta)
    pairs = neuron_merging_pairs(f, st, KEPT, [10], factor="derived")
    assert pairs.targets[0] == 5 and pairs.factors[0] == pytest.approx(t, rel=1e-12)
    _check_merge_exact(f, st, pairs)


def test_nm_without_bn_uses_weight_and_bias_rows() -> None:
    rng = np.random.default_rng(20)
    f, b = rng.standard_normal((N, 32)), rng.standard_normal(N)
    f[10], b[10] = 0.6 * f[8], 0.6 * b[8]
    st = ChannelStats.identity(b)
    pairs = neuron_merging_pairs(f, st, KEPT, [10])
    assert pairs.targets[0] == 8 and pairs.factors[0] == pytest.approx(0.6, rel=1e-12)
    _check_merge_exact(f, st, pairs)


def test_nm_degenerate_cases() -> None:
    rng = np.random.default_rng(21)
    f, st = rng.standard_normal((N, 8)), _bn(rng, positive=True)
    gamma = st.gamma.copy()
    gamma[PRUNED[2]] = 0.0
    gamma[KEPT[0]] = 0.0
    f[PRUNED[3]] = f[KEPT[1]]
    f[KEPT[2]] = 0.0
    with np.errstate(divide="raise", invalid="raise"):
        pairs = neuron_merging_pairs(f, _stats_like(st, gamma=gamma), KEPT, PRUNED)
        single = neuron_merging_pairs(f, st, [KEPT[1]], PRUNED, threshold=None)
    assert (int(PRUNED[2]), "zero_gamma_or_var") in pairs.degenerate
    assert pairs.targets[2] == -1
    assert pairs.targets[3] == KEPT[1]
    assert not np.isin(pairs.targets, [KEPT[0], KEPT[2]]).any()
    assert np.all(np.isfinite(pairs.factors)) and np.all(single.targets == KEPT[1])
    with pytest.raises(ValueError, match="different pruned"):
        apply_neuron_merging(np.ones((2, N)), KEPT, PRUNED[:2], pairs)
