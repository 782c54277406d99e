"""What an op's moment-propagation rule reads and returns (the driver is
:func:`onnx_udfc.moments.propagated.propagate`), and the moments of the linear maps that weight
layers apply (:func:`conv_moments`, :func:`linear_moments`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_udfc.core.io import tensor_array
from onnx_udfc.ops.base import attr

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


@dataclass
class MomentStep:
    """One node of the propagation: its inputs' moments and the model's settings."""

    node: onnx.NodeProto
    inits: dict[str, onnx.TensorProto]
    moments: dict[str, TensorMoments]  # of every tensor followed so far
    shapes: dict
    spatial: float  # correlation between the positions of a patch
    anchor: bool  # BatchNorm resets the moments to its running statistics
    max_full: int = MAX_FULL
    full: bool = True  # the output covariance is wanted as a matrix
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # BN variances to fit to

    @property
    def x(self) -> TensorMoments | None:
        """Moments of the first input."""
        return self.moments.get(self.node.input[0]) if self.node.input else None

    @property
    def rank(self) -> int | None:
        """Rank of the first input (None when its shape is unknown)."""
        shape = self.shapes.get(self.node.input[0])
        return len(shape) if shape is not None else None

    def const(self, name: str) -> np.ndarray | None:
        """An initializer in float64, None for a computed tensor."""
        return tensor_array(self.inits[name]).astype(np.float64) if name in self.inits else None

    def optional_const(self, pos: int) -> np.ndarray | None:
        """Constant input ``pos`` when the node has it."""
        node = self.node
        return self.const(node.input[pos]) if len(node.input) > pos and node.input[pos] else None

    def ints(self, pos: int, name: str) -> list[int] | None:
        """An integer list given as constant input ``pos`` or, in old opsets, attribute
        ``name``."""
        node = self.node
        if len(node.input) > pos and node.input[pos]:
            c = self.const(node.input[pos])
            return None if c is None else [int(v) for v in c.reshape(-1)]
        v = attr(node, name)
        return None if v is None else [int(i) for i in v]

    def with_hw(self, x: TensorMoments) -> TensorMoments:
        """``x`` with the spatial size of the node's output (pooling, striding and padding
        keep the channel statistics of the pooled positions)."""
        shape = self.shapes.get(self.node.output[0])
        if shape is None or len(shape) < 3 or not all(isinstance(d, int) for d in shape[2:]):
            return x
        hw = int(np.prod(shape[2:]))
        return x if hw == x.hw else TensorMoments(x.mean, x.cov, hw)


def passed_through(step: MomentStep) -> TensorMoments:
    """The moments of an op that keeps every channel's values (Identity, MaxPool, Resize)."""
    return step.with_hw(step.x)


# -- linear maps -----------------------------------------------------------------------------
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


def linear_moments(w: np.ndarray, b: np.ndarray | None, x: TensorMoments,
                   max_full: int = MAX_FULL, full: bool = True) -> TensorMoments:
    """Moments of ``w x + b`` (``w`` as [outputs, inputs]), the output covariance full or
    diagonal as in :func:`conv_moments`."""
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
