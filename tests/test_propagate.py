"""Moment propagation: the fast paths (diagonal covariances, float32 products, only the
covariances asked for) agree with the plain full computation."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_udfc.core.blas import single_blas_thread
from onnx_udfc.core.io import infer_shapes
from onnx_udfc.moments.gaussian import SMOOTH, Activation, gaussian_moments, gaussian_variances
from onnx_udfc.moments.propagated import TensorMoments, propagate
from onnx_udfc.ops.tensor_moments import conv_moments
from tests.helpers import bn_chain


def _reference(w: np.ndarray, x: np.ndarray, r: float) -> np.ndarray:
    """sum_p W_p C W_p^T mixed with (sum_p W_p) C (sum_p W_p)^T, one tap at a time."""
    o, c = w.shape[:2]
    w3 = w.reshape(o, c, -1)
    ind = sum(w3[:, :, k] @ x @ w3[:, :, k].T for k in range(w3.shape[2]))
    ws = w3.sum(2)
    return (1 - r) * ind + r * ws @ x @ ws.T


def _spd(n: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(n, n))
    return a @ a.T / n + 0.1 * np.eye(n)


@pytest.mark.parametrize("o,c", [(6, 5), (300, 200)])  # float64 and float32 paths
def test_conv_moments_match_reference(o, c):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(o, c, 3, 3)) / np.sqrt(9 * c)
    cov = _spd(c, rng)
    x = TensorMoments(rng.normal(size=c), cov, 16)
    ref = _reference(w, cov, 0.3)
    got = conv_moments(w, None, x, 1, 0.3)
    assert np.allclose(got.cov, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert np.allclose(got.mean, w.sum((2, 3)) @ x.mean)
    var_only = conv_moments(w, None, x, 1, 0.3, full=False)
    assert var_only.diagonal
    assert np.allclose(var_only.cov, np.diag(ref), rtol=1e-4)
    # a diagonal input, as a vector and as a matrix
    d = np.diag(cov).copy()
    as_vec = conv_moments(w, None, TensorMoments(x.mean, d, 16), 1, 0.3)
    assert np.allclose(as_vec.cov, _reference(w, np.diag(d), 0.3), rtol=1e-4,
                       atol=1e-5 * np.abs(ref).max())
    capped = conv_moments(w, None, x, 1, 0.3, max_full=o - 1)
    assert capped.diagonal and np.allclose(capped.cov, np.diag(ref), rtol=1e-4)


def test_grouped_conv_is_its_dense_equivalent():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 2, 3, 3))  # group 2: 4 inputs
    dense = np.zeros((8, 4, 3, 3))
    dense[:4, :2], dense[4:, 2:] = w[:4], w[4:]
    cov = _spd(4, rng)
    x = TensorMoments(rng.normal(size=4), cov, 9)
    assert np.allclose(conv_moments(w, None, x, 2, 0.5).cov, _reference(dense, cov, 0.5))


@pytest.mark.parametrize("act", [Activation("relu"), Activation("leaky", alpha=0.1),
                                 Activation("clip", lo=0.0, hi=1.0),
                                 *(Activation(k) for k in SMOOTH)], ids=lambda a: a.kind)
def test_variances_are_the_diagonal_of_the_full_moments(act):
    rng = np.random.default_rng(2)
    cov = _spd(5, rng)
    mu = rng.normal(size=5)
    mean, full = gaussian_moments(mu, cov, act)
    m1, var = gaussian_variances(mu, np.diag(cov), act)
    assert np.allclose(m1, mean) and np.allclose(var, np.diag(full))
    m2, var2 = gaussian_moments(mu, np.diag(cov).copy(), act)  # a 1-D covariance
    assert np.allclose(m2, mean) and np.allclose(var2, np.diag(full))


@pytest.mark.parametrize("with_bn", [True, False])
def test_keep_gives_the_same_moments_and_drops_the_rest(with_bn):
    model = bn_chain(with_bn=with_bn)
    shapes = infer_shapes(model)
    every = propagate(model, shapes)
    with single_blas_thread():
        some = propagate(model, shapes, keep=["r1"])
    assert set(some) == {"r1"}
    assert not some["r1"].diagonal
    assert np.allclose(some["r1"].cov, every["r1"].cov)
    assert np.allclose(some["r1"].mean, every["r1"].mean)
    late = propagate(model, shapes, keep=["f", "y"])  # downstream of r1: variances kept exact
    for name in ("f", "y"):
        assert np.allclose(late[name].mean, every[name].mean)
        assert np.allclose(late[name].var, every[name].var)
    diag = propagate(model, shapes, max_full=0, keep=["r1", "y"])
    assert all(m.diagonal for m in diag.values())
    assert np.allclose(diag["r1"].mean, every["r1"].mean)
    assert np.allclose(diag["r1"].var, every["r1"].var)


def test_channel_index_maps():
    """Slice (spatial and channel), Pad with zero channels and Concat, as in the akamaster
    ResNets' option-A shortcut (Slice ::2 + channel Pad)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    ints = {"s0": [0], "big": [2**62], "ax2": [2], "st2": [2], "c1": [1], "c3": [3],
            "ax1": [1], "one": [1], "pads": [0, 2, 0, 0, 0, 2, 0, 0]}
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Slice", ["r", "s0", "big", "ax2", "st2"], ["s"]),
             helper.make_node("Pad", ["s", "pads"], ["p"]),
             helper.make_node("Slice", ["r", "c1", "c3", "ax1", "one"], ["q"]),
             helper.make_node("Concat", ["r", "q"], ["cat"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 3, 8, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                           for n in ("p", "cat")], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m = propagate(model, infer_shapes(model))
    r, p, q, cat = m["r"], m["p"], m["q"], m["cat"]
    assert p.mean.size == 8 and p.hw == 32
    assert np.allclose(p.mean[2:6], r.mean) and not p.mean[[0, 1, 6, 7]].any()
    assert np.allclose(p.cov[2:6, 2:6], r.cov) and not p.cov[:2].any()
    assert np.allclose(q.mean, r.mean[1:3]) and np.allclose(q.cov, r.cov[1:3, 1:3])
    assert np.allclose(cat.cov[:4, :4], r.cov) and not cat.cov[:4, 4:].any()
