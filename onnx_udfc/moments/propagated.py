"""Data-free propagation of per-channel activation moments through a model.

Every tensor gets a :class:`TensorMoments`: the mean of each channel and the centred channel
covariance (spatial positions pooled). The input is modelled as independent channels with
user-given mean/std (default N(0, 1), the normalised input). Weight layers map moments
linearly; a 3x3 patch is modelled as ``C_in (x) ((1 - r) I + r 11^T)`` (spatial correlation
``r`` between the positions of a patch); activations use the Gaussian model of
:mod:`onnx_udfc.moments.gaussian`; a residual Add sums independent branches.

BatchNorm *anchors* the model: its output has mean beta and variance gamma^2 on the training
data, whatever the propagated scale, so only the propagated correlation is kept there. On a
BN-folded model nothing anchors and the propagated moments are used as they are.
Ops the model does not know make their outputs unknown (absent from the result).

Cost. A covariance may be held as its diagonal (a 1-D ``cov``: channels uncorrelated). Full
``[C, C]`` covariances are computed only for tensors whose full covariance is asked for (the
``keep`` tensors) and their ancestors, only up to ``max_full`` channels, and only while a
layer's work stays under ``max_work`` multiply-adds; everything else carries variances only
(the means and variances are the same either way). Large products run in float32 (the
moments are statistics of a model, far coarser than float32 rounding). Tensors no longer
needed are dropped as the walk goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_udfc.core.io import tensor_array
from onnx_udfc.moments.gaussian import activation_of, gaussian_moments
from onnx_udfc.ops.base import attr

PASS = {"MaxPool", "AveragePool", "Identity", "Dropout", "Resize", "Upsample"}
MAX_FEATURES = 4096  # Flatten expansion limit (covariance size)
MAX_FULL = 512  # channels above which a layer's output covariance is kept diagonal
MAX_WORK = 3e9  # multiply-adds above which a layer's output covariance is kept diagonal
F32_WORK = 2e7  # multiply-adds above which the products run in float32


@dataclass
class TensorMoments:
    """Channel means ``[C]`` and centred channel covariance ``[C, C]`` (or its diagonal
    ``[C]`` when the channels are modelled as uncorrelated); ``hw`` spatial size (1 for a
    feature vector)."""

    mean: np.ndarray
    cov: np.ndarray
    hw: int = 1

    @property
    def diagonal(self) -> bool:
        """True when ``cov`` holds the variances only."""
        return self.cov.ndim == 1

    @property
    def var(self) -> np.ndarray:
        """Per-channel variances ``[C]``."""
        return self.cov if self.diagonal else np.diag(self.cov)

    @property
    def full(self) -> np.ndarray:
        """The covariance as a ``[C, C]`` matrix."""
        return np.diag(self.cov) if self.diagonal else self.cov

    @property
    def second(self) -> np.ndarray:
        """Uncentred second moments ``E[x x^T]``."""
        return self.full + np.outer(self.mean, self.mean)


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


def _dense(w: np.ndarray, group: int) -> np.ndarray:
    """``[O, Cin/group, P]`` grouped weights as the equivalent dense ``[O, Cin, P]``."""
    o, cg, p = w.shape
    if group == 1:
        return w
    full = np.zeros((o, cg * group, p))
    og = o // group
    for g in range(group):
        full[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
    return full


def conv_moments(w: np.ndarray, b: np.ndarray | None, x: TensorMoments, group: int,
                 r: float, target: np.ndarray | None = None,
                 max_full: int = MAX_FULL, full: bool = True,
                 max_work: float = MAX_WORK) -> TensorMoments:
    """Moments of a Conv's output: ``w`` is ``[O, Cin/group, kh, kw]``. The output covariance
    is full when ``full`` and it has at most ``max_full`` channels and costs at most
    ``max_work`` multiply-adds, diagonal otherwise. With ``target`` (the output variances a
    following BatchNorm recorded) the spatial correlation ``r`` is fitted so that the
    predicted variances match them (relative least squares, clipped to [0, 1])."""
    o, cg = w.shape[:2]
    p = int(np.prod(w.shape[2:]))
    w3 = _dense(w.reshape(o, cg, p).astype(np.float64), group)
    c = w3.shape[1]
    ws = w3.sum(2)  # [o, c]
    mean = ws @ x.mean + (0.0 if b is None else b)
    work = o * c * p * (o + (0 if x.diagonal else c))
    full = full and o <= max_full and work <= max_work
    dt = np.float32 if work > F32_WORK else np.float64
    wf = w3.reshape(o, c * p).astype(dt, copy=False)  # columns: channel-major, then tap
    wsd = ws.astype(dt, copy=False)
    if x.diagonal:
        d = x.cov.astype(dt, copy=False)
        dp = np.repeat(d, p)
        if full:
            ind = (wf * dp) @ wf.T
            tot = (wsd * d) @ wsd.T
        else:
            ind = (wf * wf) @ dp
            tot = (wsd * wsd) @ d
    else:
        cov = x.cov.astype(dt, copy=False)
        # Y[c, o, p] = sum_c' C[c, c'] w[o, c', p]
        wt = np.ascontiguousarray(w3.astype(dt, copy=False).transpose(1, 0, 2)).reshape(c, o * p)
        y = (cov @ wt).reshape(c, o, p)
        yt = np.ascontiguousarray(y.transpose(1, 0, 2)).reshape(o, c * p)  # [o, (c, p)]
        ys = y.sum(2).T  # [o, c]: C ws^T, transposed
        if full:
            ind = wf @ yt.T
            tot = wsd @ ys.T
        else:
            ind = np.einsum("ij,ij->i", wf, yt)
            tot = np.einsum("ij,ij->i", wsd, ys)
    ind, tot = ind.astype(np.float64), tot.astype(np.float64)
    if target is not None and target.size == o and p > 1:
        t = np.where(target > 0, target, 1.0)
        dind, dtot = (np.diag(ind), np.diag(tot)) if full else (ind, tot)
        da, db = dind / t, (dtot - dind) / t
        den = float(db @ db)
        if den > 0:
            r = float(np.clip((1.0 - da) @ db / den, 0.0, 1.0))
    if full:
        out = (1.0 - r) * ind + r * tot
        out = 0.5 * (out + out.T)
    else:
        out = (1.0 - r) * ind + r * tot
    return TensorMoments(mean, out, x.hw)


def _linear(w: np.ndarray, b: np.ndarray | None, x: TensorMoments,
            max_full: int = MAX_FULL, full: bool = True) -> TensorMoments:
    mean = w @ x.mean + (0.0 if b is None else b)
    o, c = w.shape
    work = o * c * (o + (0 if x.diagonal else c))
    full = full and o <= max_full and work <= MAX_WORK
    dt = np.float32 if work > F32_WORK else np.float64
    wd = w.astype(dt, copy=False)
    if x.diagonal:
        d = x.cov.astype(dt, copy=False)
        cov = (wd * d) @ wd.T if full else (wd * wd) @ d
    else:
        y = wd @ x.cov.astype(dt, copy=False)
        cov = y @ wd.T if full else np.einsum("ij,ij->i", y, wd)
    cov = cov.astype(np.float64)
    return TensorMoments(mean, 0.5 * (cov + cov.T) if full else cov, 1)


def _batchnorm(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], x: TensorMoments,
               anchor: bool) -> TensorMoments | None:
    if not all(n in inits for n in node.input[1:5]):
        return None
    g, beta, mu, var = (tensor_array(inits[n]).astype(np.float64) for n in node.input[1:5])
    a = g / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    if not anchor:
        scale = a * a if x.diagonal else np.outer(a, a)
        return TensorMoments(a * (x.mean - mu) + beta, x.cov * scale, x.hw)
    if x.diagonal:
        return TensorMoments(beta.copy(), g * g, x.hw)
    sd = np.sqrt(np.clip(np.diag(x.cov), 0.0, None))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    corr = x.cov * np.outer(inv, inv)
    np.fill_diagonal(corr, 1.0)
    return TensorMoments(beta.copy(), corr * np.outer(g, g), x.hw)


def _diag_only(m: TensorMoments) -> TensorMoments:
    return m if m.diagonal else TensorMoments(m.mean, np.diag(m.cov).copy(), m.hw)


def needs_full(model: onnx.ModelProto, keep: Iterable[str]) -> set[str]:
    """The ``keep`` tensors and every tensor their full covariance depends on."""
    need = set(keep)
    for node in reversed(model.graph.node):
        if any(o in need for o in node.output):
            need.update(i for i in node.input if i)
    return need


def propagate(model: onnx.ModelProto, shapes: dict, *, spatial: float = 0.5,
              anchor: bool = True, fit_spatial: bool = False, max_full: int = MAX_FULL,
              input_mean: Sequence[float] | None = None,
              input_std: Sequence[float] | None = None,
              keep: Iterable[str] | None = None) -> dict[str, TensorMoments]:
    """Moments of every tensor the model can follow (see the module doc). With ``keep``,
    only those tensors are returned, and only they and their ancestors get full
    covariances."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    out: dict[str, TensorMoments] = {}
    targets: dict[str, np.ndarray] = {}
    wanted = None if keep is None else set(keep)
    need = None if wanted is None else needs_full(model, wanted)
    last: dict[str, int] = {}
    if wanted is not None:
        for i, node in enumerate(g.node):
            for name in node.input:
                last[name] = i
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
        out[inp.name] = TensorMoments(mean, np.asarray(std, float) ** 2, hw)
    for i, node in enumerate(g.node):
        full = need is None or (bool(node.output) and node.output[0] in need)
        try:
            res = _step(node, inits, out, shapes, spatial, anchor, targets, max_full, full)
        except (ValueError, IndexError, KeyError):
            res = None
        if res is not None and node.output and np.all(np.isfinite(res.cov)):
            out[node.output[0]] = res if full else _diag_only(res)
        if wanted is not None:
            for name in node.input:
                if last.get(name) == i and name not in wanted:
                    out.pop(name, None)
    if wanted is not None:
        return {k: v for k, v in out.items() if k in wanted}
    return out


def _const(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return tensor_array(inits[name]).astype(np.float64) if name in inits else None


def _with_hw(x: TensorMoments, shapes: dict, name: str) -> TensorMoments:
    """``x`` with the spatial size of tensor ``name`` (pooling, striding and padding keep the
    channel statistics of the pooled positions)."""
    shape = shapes.get(name)
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
        return x
    hw = int(np.prod(shape[2:]))
    return x if hw == x.hw else TensorMoments(x.mean, x.cov, hw)


def _take(x: TensorMoments, idx: np.ndarray) -> TensorMoments:
    cov = x.cov[idx] if x.diagonal else x.cov[np.ix_(idx, idx)]
    return TensorMoments(x.mean[idx], cov, x.hw)


def _ints(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto, pos: int,
          name: str) -> list[int] | None:
    """An integer list given as input ``pos`` (constant) or, in old opsets, attribute
    ``name``."""
    if len(node.input) > pos and node.input[pos]:
        c = _const(inits, node.input[pos])
        return None if c is None else [int(v) for v in c.reshape(-1)]
    v = attr(node, name)
    return None if v is None else [int(i) for i in v]


def _channel_map(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
                 out: dict[str, TensorMoments], shapes: dict,
                 x: TensorMoments) -> TensorMoments | None:
    """Slice, Gather, Pad and Concat: index maps on the channel axis (Concat: independent
    inputs, block-diagonal covariance; Pad: constant channels), pass-through elsewhere."""
    op, c = node.op_type, x.mean.size
    shape = shapes.get(node.input[0])
    rank = len(shape) if shape is not None else None
    if op == "Concat":
        axis = int(attr(node, "axis", 1))
        if rank is None or axis % rank != 1:
            return None
        parts = [out.get(n) for n in node.input]
        if any(p is None for p in parts):
            return None
        mean = np.concatenate([p.mean for p in parts])
        if all(p.diagonal for p in parts):
            return TensorMoments(mean, np.concatenate([p.cov for p in parts]), x.hw)
        cov = np.zeros((mean.size, mean.size))
        i = 0
        for p in parts:
            cov[i:i + p.mean.size, i:i + p.mean.size] = p.full
            i += p.mean.size
        return TensorMoments(mean, cov, x.hw)
    if op == "Gather":
        axis = int(attr(node, "axis", 0))
        idx = _const(inits, node.input[1])
        if rank is None or axis % rank == 0:
            return None
        if axis % rank != 1:
            return _with_hw(x, shapes, node.output[0])
        if idx is None or idx.ndim != 1:
            return None
        return _take(x, np.mod(idx.astype(np.int64), c))
    if op == "Slice":
        starts, ends = _ints(inits, node, 1, "starts"), _ints(inits, node, 2, "ends")
        if starts is None or ends is None or rank is None:
            return None
        axes = _ints(inits, node, 3, "axes") or list(range(len(starts)))
        steps = _ints(inits, node, 4, "steps") or [1] * len(starts)
        idx = np.arange(c)
        for a, b, e, st in zip(axes, starts, ends, steps, strict=False):
            if a % rank == 0:
                return None
            if a % rank == 1:
                idx = idx[slice(b, e, st)]
        return _with_hw(_take(x, idx) if idx.size != c or np.any(idx != np.arange(c)) else x,
                        shapes, node.output[0])
    # Pad
    mode = attr(node, "mode", b"constant")
    pads = _ints(inits, node, 1, "pads")
    if pads is None or rank is None or len(pads) != 2 * rank:
        return None
    before, after = pads[1], pads[1 + rank]
    if before == 0 and after == 0:
        return _with_hw(x, shapes, node.output[0])
    if mode not in (b"constant", "constant") or before < 0 or after < 0:
        return None
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        v = _const(inits, node.input[2])
        if v is None:
            return None
        value = float(v.reshape(-1)[0])
    elif attr(node, "value") is not None:
        value = float(attr(node, "value"))
    n = before + c + after
    mean = np.full(n, value)
    mean[before:before + c] = x.mean
    if x.diagonal:
        cov = np.zeros(n)
        cov[before:before + c] = x.cov
    else:
        cov = np.zeros((n, n))
        cov[before:before + c, before:before + c] = x.cov
    return _with_hw(TensorMoments(mean, cov, x.hw), shapes, node.output[0])


def _add_cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == b.ndim:
        return a + b
    return a + np.diag(b) if a.ndim == 2 else np.diag(a) + b


def _step(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
          out: dict[str, TensorMoments], shapes: dict, r: float, anchor: bool,
          targets: dict[str, np.ndarray] | None = None,
          max_full: int = MAX_FULL, full: bool = True) -> TensorMoments | None:
    op = node.op_type
    x = out.get(node.input[0]) if node.input else None
    if op == "Add" and len(node.input) == 2:
        a, b = (out.get(n) for n in node.input)
        if a is not None and b is not None and a.mean.size == b.mean.size:
            return TensorMoments(a.mean + b.mean, _add_cov(a.cov, b.cov), a.hw)
        c = _const(inits, node.input[1])
        if a is not None and c is not None and c.size in (1, a.mean.size):
            return TensorMoments(a.mean + c.reshape(-1), a.cov, a.hw)
        return None
    if x is None:
        return None
    if op == "Conv" and node.input[1] in inits:
        b = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return conv_moments(_const(inits, node.input[1]), b, x, int(attr(node, "group", 1)), r,
                            (targets or {}).get(node.output[0]), max_full, full)
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
        return _linear(w, b, x, max_full, full) if w.shape[1] == x.mean.size else None
    if op == "BatchNormalization":
        return _batchnorm(node, inits, x, anchor)
    act = activation_of(op, _attrs(node))
    if op == "Clip" and len(node.input) >= 3:
        lo = _const(inits, node.input[1]) if node.input[1] else None
        hi = _const(inits, node.input[2]) if node.input[2] else None
        act = act.__class__("clip", lo=-np.inf if lo is None else float(lo),
                            hi=np.inf if hi is None else float(hi))
    if act is not None:
        cov = x.cov if full or x.diagonal else np.diag(x.cov)
        mean, cov = gaussian_moments(x.mean, cov, act)
        return TensorMoments(mean, cov, x.hw)
    if op in ("Slice", "Gather", "Pad", "Concat"):
        return _channel_map(node, inits, out, shapes, x)
    if op in PASS:
        return _with_hw(x, shapes, node.output[0])
    if op in ("GlobalAveragePool", "ReduceMean"):
        return TensorMoments(x.mean, x.cov * ((1.0 - r) / max(x.hw, 1) + r), 1)
    if op in ("Flatten", "Reshape"):
        shape = shapes.get(node.output[0])
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            return None
        f = int(shape[1])
        if f == x.mean.size:
            return TensorMoments(x.mean, x.cov, 1)
        if f == x.mean.size * x.hw:
            mean = np.repeat(x.mean, x.hw)
            if not full:
                return TensorMoments(mean, np.repeat(x.var, x.hw), 1)
            if f <= MAX_FEATURES:
                return TensorMoments(mean, np.kron(x.full, _patch(r, x.hw)), 1)
            return TensorMoments(mean, np.repeat(x.var, x.hw), 1)
    return None
