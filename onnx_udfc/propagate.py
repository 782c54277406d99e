"""Data-free propagation of per-channel activation moments through a model.

Every tensor gets a :class:`TensorMoments`: the mean of each channel and the centred channel
covariance (spatial positions pooled). The input is modelled as independent channels with
user-given mean/std (default N(0, 1), the normalised input). Weight layers map moments
linearly; a 3x3 patch is modelled as ``C_in (x) ((1 - r) I + r 11^T)`` (spatial correlation
``r`` between the positions of a patch); activations use the Gaussian model of
:mod:`onnx_udfc.moments`; a residual Add sums independent branches.

BatchNorm *anchors* the model: its output has mean beta and variance gamma^2 on the training
data, whatever the propagated scale, so only the propagated correlation is kept there. On a
BN-folded model nothing anchors and the propagated moments are used as they are.
Ops the model does not know make their outputs unknown (absent from the result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_udfc.io import tensor_array
from onnx_udfc.moments import activation_of, gaussian_moments
from onnx_udfc.rules import attr

PASS = {"MaxPool", "AveragePool", "Identity", "Dropout", "Pad", "Resize", "Upsample"}
MAX_FEATURES = 4096  # Flatten expansion limit (covariance size)


@dataclass
class TensorMoments:
    """Channel means ``[C]`` and centred channel covariance ``[C, C]``; ``hw`` spatial size
    (1 for a feature vector)."""

    mean: np.ndarray
    cov: np.ndarray
    hw: int = 1

    @property
    def second(self) -> np.ndarray:
        """Uncentred second moments ``E[x x^T]``."""
        return self.cov + np.outer(self.mean, self.mean)


def _attrs(node: onnx.NodeProto) -> dict[str, float]:
    out: dict[str, float] = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.FLOAT:
            out[a.name] = a.f
        elif a.type == onnx.AttributeProto.INT:
            out[a.name] = float(a.i)
    return out


def _patch(r: float, p: int) -> np.ndarray:
    return (1.0 - r) * np.eye(p) + r * np.ones((p, p))


def conv_moments(w: np.ndarray, b: np.ndarray | None, x: TensorMoments, group: int,
                 r: float, target: np.ndarray | None = None,
                 max_full: int = 512) -> TensorMoments:
    """Moments of a Conv's output: ``w`` is ``[O, Cin/group, kh, kw]``. With ``target`` (the
    output variances a following BatchNorm recorded) the spatial correlation ``r`` is fitted
    so that the predicted variances match them (relative least squares, clipped to [0, 1])."""
    o, cg = w.shape[:2]
    p = int(np.prod(w.shape[2:]))
    w3 = w.reshape(o, cg, p).astype(np.float64)
    if group > 1:  # dense equivalent
        full = np.zeros((o, cg * group, p))
        og = o // group
        for g in range(group):
            full[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w3[g * og:(g + 1) * og]
        w3 = full
    mean = w3.sum(2) @ x.mean + (0.0 if b is None else b)
    wt = np.ascontiguousarray(w3.transpose(2, 0, 1))  # [p, o, c]
    ws = w3.sum(2)
    if o > max_full:  # variances only (cost and memory): channels taken as uncorrelated
        diag_in = _is_diagonal(x.cov)
        var = np.zeros(o)
        for k in range(p):
            var += (wt[k] ** 2) @ np.diag(x.cov) if diag_in else \
                np.sum((wt[k] @ x.cov) * wt[k], axis=1)
        fv = (ws ** 2) @ np.diag(x.cov) if diag_in else np.sum((ws @ x.cov) * ws, axis=1)
        return TensorMoments(mean, np.diag((1.0 - r) * var + r * fv), x.hw)
    ind = np.zeros((o, o))
    for k in range(p):  # sum_p W_p C W_p^T (BLAS)
        ind += (wt[k] @ x.cov) @ wt[k].T
    full = ws @ x.cov @ ws.T
    if target is not None and target.size == o and p > 1:
        t = np.where(target > 0, target, 1.0)
        da, db = np.diag(ind) / t, (np.diag(full) - np.diag(ind)) / t
        den = float(db @ db)
        if den > 0:
            r = float(np.clip((1.0 - da) @ db / den, 0.0, 1.0))
    return TensorMoments(mean, (1.0 - r) * ind + r * full, x.hw)


def _is_diagonal(c: np.ndarray) -> bool:
    return not np.any(c - np.diag(np.diag(c)))


def _linear(w: np.ndarray, b: np.ndarray | None, x: TensorMoments,
            max_full: int = 512) -> TensorMoments:
    mean = w @ x.mean + (0.0 if b is None else b)
    if w.shape[0] > max_full:
        return TensorMoments(mean, np.diag(np.sum((w @ x.cov) * w, axis=1)), 1)
    return TensorMoments(mean, w @ x.cov @ w.T, 1)


def _batchnorm(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], x: TensorMoments,
               anchor: bool) -> TensorMoments | None:
    if not all(n in inits for n in node.input[1:5]):
        return None
    g, beta, mu, var = (tensor_array(inits[n]).astype(np.float64) for n in node.input[1:5])
    a = g / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    if not anchor:
        return TensorMoments(a * (x.mean - mu) + beta, x.cov * np.outer(a, a), x.hw)
    sd = np.sqrt(np.clip(np.diag(x.cov), 0.0, None))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    corr = x.cov * np.outer(inv, inv)
    np.fill_diagonal(corr, 1.0)
    return TensorMoments(beta.copy(), corr * np.outer(g, g), x.hw)


def propagate(model: onnx.ModelProto, shapes: dict, *, spatial: float = 0.5,
              anchor: bool = True, fit_spatial: bool = False, max_full: int = 512,
              input_mean: Sequence[float] | None = None,
              input_std: Sequence[float] | None = None) -> dict[str, TensorMoments]:
    """Moments of every tensor the model can follow (see the module doc)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out: dict[str, TensorMoments] = {}
    targets: dict[str, np.ndarray] = {}
    if fit_spatial:
        for n in g.node:
            if n.op_type == "BatchNormalization" and n.input[4] in inits:
                var = tensor_array(inits[n.input[4]]).astype(np.float64)
                targets[n.input[0]] = var
    for inp in g.input:
        if inp.name in inits:
            continue
        shape = shapes.get(inp.name)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
            continue
        c = int(shape[1])
        hw = int(np.prod([d for d in shape[2:]])) if len(shape) > 2 else 1
        mean = np.zeros(c) if input_mean is None else np.broadcast_to(
            np.asarray(input_mean, float), (c,)).copy()
        std = np.ones(c) if input_std is None else np.broadcast_to(
            np.asarray(input_std, float), (c,))
        out[inp.name] = TensorMoments(mean, np.diag(std ** 2), hw)
    for node in g.node:
        try:
            res = _step(node, inits, out, shapes, spatial, anchor, targets, max_full)
        except (ValueError, IndexError, KeyError):
            res = None
        if res is not None and node.output and np.all(np.isfinite(res.cov)):
            out[node.output[0]] = res
    return out


def _const(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return tensor_array(inits[name]).astype(np.float64) if name in inits else None


def _step(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
          out: dict[str, TensorMoments], shapes: dict, r: float, anchor: bool,
          targets: dict[str, np.ndarray] | None = None,
          max_full: int = 512) -> TensorMoments | None:
    op = node.op_type
    x = out.get(node.input[0]) if node.input else None
    if op == "Add" and len(node.input) == 2:
        a, b = (out.get(n) for n in node.input)
        if a is not None and b is not None and a.mean.size == b.mean.size:
            return TensorMoments(a.mean + b.mean, a.cov + b.cov, a.hw)
        c = _const(inits, node.input[1])
        if a is not None and c is not None and c.size in (1, a.mean.size):
            return TensorMoments(a.mean + c.reshape(-1), a.cov, a.hw)
        return None
    if x is None:
        return None
    if op == "Conv" and node.input[1] in inits:
        b = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return conv_moments(_const(inits, node.input[1]), b, x, int(attr(node, "group", 1)), r,
                            (targets or {}).get(node.output[0]), max_full)
    if op in ("Gemm", "MatMul") and node.input[1] in inits:
        w = _const(inits, node.input[1])
        if w.ndim != 2 or (op == "Gemm" and attr(node, "transA", 0)):
            return None
        if op == "MatMul" or not attr(node, "transB", 0):
            w = w.T
        if op == "Gemm":
            w = w * float(attr(node, "alpha", 1.0))
        b = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if b is not None and op == "Gemm":
            b = np.broadcast_to(b.reshape(-1) * float(attr(node, "beta", 1.0)), (w.shape[0],))
        return _linear(w, b, x, max_full) if w.shape[1] == x.mean.size else None
    if op == "BatchNormalization":
        return _batchnorm(node, inits, x, anchor)
    act = activation_of(op, _attrs(node))
    if op == "Clip" and len(node.input) >= 3:
        lo = _const(inits, node.input[1]) if node.input[1] else None
        hi = _const(inits, node.input[2]) if node.input[2] else None
        act = act.__class__("clip", lo=-np.inf if lo is None else float(lo),
                            hi=np.inf if hi is None else float(hi))
    if act is not None:
        mean, cov = gaussian_moments(x.mean, x.cov, act)
        return TensorMoments(mean, cov, x.hw)
    if op in PASS:
        return x
    if op in ("GlobalAveragePool", "ReduceMean"):
        return TensorMoments(x.mean, x.cov * ((1.0 - r) / max(x.hw, 1) + r), 1)
    if op in ("Flatten", "Reshape"):
        shape = shapes.get(node.output[0])
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            return None
        f = int(shape[1])
        if f == x.mean.size:
            return TensorMoments(x.mean, x.cov, 1)
        if f == x.mean.size * x.hw and f <= MAX_FEATURES:
            return TensorMoments(np.repeat(x.mean, x.hw), np.kron(x.cov, _patch(r, x.hw)), 1)
    return None
