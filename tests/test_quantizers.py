"""Tests of the weight quantizers (onnx_udfc.quant.grids)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_udfc.quant.grids import (
    paper_quantize,
    paper_quantize_params,
    quantize,
    quantize_asymmetric,
    quantize_asymmetric_params,
    quantize_params,
    quantize_symmetric,
    quantize_symmetric_params,
)

SCHEMES = ("paper", "symmetric", "asymmetric")


def _weights(seed: int = 0) -> np.ndarray:
    """Conv-like weights whose channels have very different ranges."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 3, 3, 3))
    return w * np.geomspace(0.01, 3.0, 8)[:, None, None, None]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", ("tensor", "channel"))
@pytest.mark.parametrize("bits", range(2, 9))
def test_number_of_levels(scheme: str, granularity: str, bits: int) -> None:
    w = _weights(bits)
    wq = quantize(w, bits, scheme, granularity)
    assert wq.shape == w.shape and np.all(np.isfinite(wq))
    groups = [wq] if granularity == "tensor" else list(wq)
    for g in groups:
        assert np.unique(g).size <= 2**bits
    if scheme == "symmetric":  # the most negative code is unused
        for g in groups:
            assert np.unique(g).size <= 2**bits - 1


@pytest.mark.parametrize("scheme", ("symmetric", "asymmetric"))
@pytest.mark.parametrize("granularity", ("tensor", "channel"))
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_integer_grids_represent_zero(scheme: str, granularity: str, bits: int) -> None:
    w = _weights(1)
    w[:, 0, 0, 0] = 0.0
    wq = quantize(w, bits, scheme, granularity)
    assert np.all(wq[:, 0, 0, 0] == 0.0)
    # All-positive input: the asymmetric range is widened to include 0.
    pos = np.abs(w) + 0.5
    pos[0, 0, 0, 0] = 0.0
    assert quantize(pos, bits, scheme, granularity)[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_paper_grid_is_symmetric_without_zero(bits: int) -> None:
    w = _weights(2)
    m = np.abs(w).max()
    levels = 2**bits - 1
    grid = m * (2.0 * np.arange(levels + 1) / levels - 1.0)
    assert np.all(grid != 0.0)
    np.testing.assert_allclose(np.sort(grid), np.sort(-grid), rtol=0, atol=1e-12 * m)
    wq = paper_quantize(w, bits)
    assert np.all(wq != 0.0)
    dist = np.abs(wq.reshape(-1, 1) - grid[None, :]).min(axis=1)
    assert dist.max() <= 1e-12 * m
    # Round-to-nearest on that grid: error at most half a step.
    assert np.abs(wq - w).max() <= m / levels * (1 + 1e-9)
    # Exact zeros map to the smallest positive or negative level, never to 0.
    z = paper_quantize(np.array([0.0, -2.0, 2.0]), bits)
    assert abs(z[0]) == pytest.approx(2.0 / levels)


def test_paper_formula_two_bits() -> None:
    # Eq. 3 with the max|W| rescale: 4 levels at {-1, -1/3, 1/3, 1} * max|W|.
    w = np.array([-2.0, -0.5, 0.1, 0.9, 2.0])
    np.testing.assert_allclose(paper_quantize(w, 2), [-2, -2 / 3, 2 / 3, 2 / 3, 2])
    r = paper_quantize_params(w, 2)
    assert r.q is None and r.zero_point is None and r.scale == pytest.approx(4 / 3)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", (2, 3, 4, 6, 8))
def test_per_channel_error_not_larger(scheme: str, bits: int) -> None:
    w = _weights(3)
    err_t = np.sum((quantize(w, bits, scheme, "tensor") - w) ** 2)
    err_c = np.sum((quantize(w, bits, scheme, "channel") - w) ** 2)
    assert err_c <= err_t


@pytest.mark.parametrize("bits", (1, 9, 0, -3, 2.5, True, "4", None))
def test_invalid_bits_raise(bits: object) -> None:
    for fn in (paper_quantize, quantize_symmetric, quantize_asymmetric):
        with pytest.raises(ValueError, match=r"^bits must be an integer in 2\.\.8, got"):
            fn(np.ones(4), bits)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="scheme"):
        quantize(np.ones(3), 4, scheme="int4")
    with pytest.raises(ValueError, match="granularity"):
        quantize(np.ones(3), 4, granularity="group")
    with pytest.raises(ValueError, match="axis"):
        quantize_symmetric(np.ones((2, 2)), 4, axis=1)
    with pytest.raises(ValueError, match="finite"):
        quantize_symmetric(np.array([1.0, np.nan]), 4)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", ("tensor", "channel"))
def test_zero_tensor_and_zero_channel(scheme: str, granularity: str) -> None:
    with np.errstate(all="raise"):  # any division by zero fails the test
        r = quantize_params(np.zeros((3, 4)), 4, scheme, granularity)
        assert np.all(r.dequantized == 0.0)
        assert np.all(np.isfinite(r.scale))
        if scheme != "paper":
            assert np.all(r.scale > 0)
        w = _weights(4)
        w[2] = 0.0
        wq = quantize(w, 4, scheme, granularity)
        assert np.all(np.isfinite(wq))
        if granularity == "channel":
            assert np.all(wq[2] == 0.0)


@pytest.mark.parametrize("granularity", ("tensor", "channel"))
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_integer_codes_reproduce_dequantized(granularity: str, bits: int) -> None:
    w = _weights(5)
    axis = None if granularity == "tensor" else 0
    for fn, lo, hi in (
        (quantize_symmetric_params, -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1),
        (quantize_asymmetric_params, 0, 2**bits - 1),
    ):
        r = fn(w, bits, axis)
        assert r.axis == axis and r.bits == bits
        assert r.q is not None and r.zero_point is not None
        assert np.issubdtype(r.q.dtype, np.integer) and r.q.dtype == r.zero_point.dtype
        assert r.q.min() >= lo and r.q.max() <= hi
        assert r.scale.shape == (() if axis is None else (8,))
        shape = () if axis is None else (8, 1, 1, 1)
        scale = r.scale.reshape(shape)
        zp = r.zero_point.astype(np.float64).reshape(shape)
        np.testing.assert_allclose((r.q - zp) * scale, r.dequantized, rtol=0, atol=1e-12)
        # Rounding, and clipping past a rounded zero point, each cost at most half a step.
        assert np.all(np.abs(r.dequantized - w) <= 0.5 * scale * (1 + 1e-9))


def test_symmetric_values() -> None:
    w = np.array([-1.0, -0.4, 0.0, 0.2, 1.0])
    # 3 bits: qmax 3, scale 1/3.
    np.testing.assert_allclose(quantize_symmetric(w, 3), [-1, -1 / 3, 0, 1 / 3, 1])
    r = quantize_asymmetric_params(np.array([0.0, 1.0, 3.0]), 2)
    assert r.scale == pytest.approx(1.0) and int(r.zero_point) == 0
    np.testing.assert_allclose(r.dequantized, [0.0, 1.0, 3.0])
    # Strictly positive input: the range is still [0, max], so 0 stays on the grid.
    r = quantize_asymmetric_params(np.array([[1.0, 3.0], [2.0, 6.0]]), 2, axis=0)
    np.testing.assert_allclose(r.scale, [1.0, 2.0])
    np.testing.assert_array_equal(r.zero_point, [0, 0])
    np.testing.assert_allclose(r.dequantized, [[1.0, 3.0], [2.0, 6.0]])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dtype_preserved_and_input_untouched(scheme: str) -> None:
    w = _weights(6).astype(np.float32)
    before = w.copy()
    wq = quantize(w, 4, scheme, "channel")
    assert wq.dtype == np.float32
    np.testing.assert_array_equal(w, before)
    direct = {"paper": paper_quantize, "symmetric": quantize_symmetric,
              "asymmetric": quantize_asymmetric}[scheme](w, 4, 0)
    np.testing.assert_array_equal(wq, direct)
