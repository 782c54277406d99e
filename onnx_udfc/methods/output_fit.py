"""Output-space refit of the next layer in ``--sequential`` udfc+.

The channel-space fit of :mod:`~.sequential` replaces each channel the next layer reads
by a linear combination of the kept channels *at the same position*. A convolution reads a
whole patch, though: once the kept channels have drifted, neighbouring positions of the kept
channels carry information a per-position map cannot use. Here the next convolution itself is
refitted, ThiNet / channel-pruning style (Luo et al. 2017; He et al. 2017), by ridge regression
of its *original* output on the patches (im2col) of the kept channels the compressed network
feeds it:

    W'_K, c = argmin || Y - P~_K W_K^T - c ||^2 + lam d || W_K - W0_K ||^2,

``W0_K`` the weights after the channel-space fit (the ridge pulls toward them) and ``d`` the
mean patch variance. Where the layer's BatchNorm output is added to a residual shortcut, the
target also cancels the drift that arrives through the shortcut:

    Y = y_orig - (s~ - s) sqrt(var + eps) / gamma,

so that ``BN(conv'(x~)) + s~`` matches the original block output ``BN(conv(x)) + s``; with the
BN folded into the Conv (deployed exports) the Conv's output is what the Add sums, and
``Y = y_orig - (s~ - s)``.
The data term is weighted per output channel by the BN gain ``gamma^2 / (var + eps)`` (what the
fit changes is seen after the BN): an output the BN nearly silences stays near its old weights
instead of growing huge, which 4-bit per-tensor scales cannot afford. On the NM ResNet-56
(l1, 4 bit, inverted images, seed 0) it lifted ``--sequential`` from 79.65 to 86.82 % top-1 at
50 % pruning (see README). Layers whose patch is longer than ``MAX_PATCH`` keep the
channel-space fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.channels.stats import follower_batchnorm
from onnx_udfc.core.io import set_tensor_array, tensor_array

MAX_PATCH = 2400  # patch length (kept channels x taps) above which the refit is skipped


@dataclass
class OutputTarget:
    """A Conv that reads the producer's activation directly, with what its fit needs."""

    node: onnx.NodeProto
    batchnorm: onnx.NodeProto | None  # the BN right after it (the constant goes there)
    shortcut: str | None  # the other input of the Add after that BN


def output_target(ctx: ChannelAnalysis, node: onnx.NodeProto, tensor: str
                  ) -> OutputTarget | None:
    """The refit target for absorber ``node`` reading ``tensor``, or None when it is not a
    plain (group 1, NOTSET padding, undilated, bias or BN for the constant) Conv reading it."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if (node.op_type != "Conv" or node.input[0] != tensor or a.get("group", 1) != 1
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or any(d != 1 for d in a.get("dilations", [1])) or node.input[1] not in ctx.inits
            or len(ctx.shapes.get(tensor, [])) != 4):
        return None
    outputs = {o.name for o in ctx.graph.output}
    bn = follower_batchnorm(node, ctx.consumers, outputs)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if bn is not None and not all(n in ctx.inits for n in bn.input[1:5]):
        bn = None
    if bn is None and not has_bias:
        return None
    # the tensor a residual Add sums: the BN's output, or the Conv's own with the BN folded
    summed = bn.output[0] if bn is not None else node.output[0]
    shortcut = None
    readers = ctx.consumers.get(summed, [])
    if summed not in outputs and len(readers) == 1 and readers[0].op_type == "Add" \
            and len(readers[0].input) == 2:
        other = [i for i in readers[0].input if i != summed]
        if len(other) == 1 and other[0] not in ctx.inits and \
                ctx.shapes.get(other[0]) == ctx.shapes.get(summed):
            shortcut = other[0]
    return OutputTarget(node, bn, shortcut)


def patches(x: np.ndarray, kernel: list[int], pads: list[int], strides: list[int]
            ) -> np.ndarray:
    """im2col of ``x [N, C, H, W]``: rows ``(n, h, w)``, columns ``(c, kh, kw)`` in the order
    of a Conv weight ``[O, C, kh, kw]`` flattened."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
    wo = (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
    cols = np.empty((n, c, kernel[0], kernel[1], ho, wo), np.float64)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            cols[:, :, i, j] = xp[:, :, i:i + strides[0] * ho:strides[0],
                                  j:j + strides[1] * wo:strides[1]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kernel[0] * kernel[1])


def ridge_fit(p: np.ndarray, y: np.ndarray, w0: np.ndarray, lam: float,
              weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(W [D, O], c [O])`` minimising ``sum_o s_o ||y_o - p w_o - c_o||^2 / n +
    lam d ||W - w0||^2`` (``d``: the mean variance of the columns of ``p``; ``s = weight``,
    relative to its mean, 1 by default). An output with ``s_o = 0`` keeps ``w0``."""
    pm, ym = p.mean(0), y.mean(0)
    pc = p - pm
    cov = pc.T @ pc / len(p)
    d = float(np.mean(np.diag(cov))) if cov.size else 0.0
    r = lam * d + 1e-12 * max(d, 1e-30)
    s = np.ones(y.shape[1]) if weight is None else np.asarray(weight, np.float64)
    s = s / s.mean() if s.mean() > 0 else np.ones_like(s)
    ro = np.where(s > 0, r / np.where(s > 0, s, 1.0), np.inf)
    evals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    rhs = vecs.T @ (pc.T @ (y - ym) / len(p))
    prior = vecs.T @ w0
    lam_eig = np.clip(evals, 0, None)[:, None]
    finite = np.where(np.isinf(ro), 1.0, ro)[None, :]
    coef = np.where(np.isinf(ro)[None, :], prior, (rhs + finite * prior) / (lam_eig + finite))
    w = vecs @ coef
    return w, ym - pm @ w


def refit_output(ctx: ChannelAnalysis, original: onnx.ModelProto, target: OutputTarget,
                 kept: np.ndarray, x_now: np.ndarray, y_orig: np.ndarray,
                 shortcut_now: np.ndarray | None, shortcut_orig: np.ndarray | None,
                 bn_var: np.ndarray | None, lam: float) -> bool:
    """Refit ``target``'s columns of the ``kept`` input channels and its constant (module
    docstring). ``x_now``: the input the compressed network gives it; ``y_orig``: the original
    network's Conv output; ``bn_var``: the variance its BN normalises by on these samples.
    Columns of the other input channels are zeroed (they are removed next). False when the
    patch is too long to fit."""
    node, inits = target.node, ctx.inits
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    w_init = inits[node.input[1]]
    w = tensor_array(w_init).astype(np.float64)
    kernel = list(w.shape[2:])
    if kept.size * int(np.prod(kernel)) > MAX_PATCH:
        return False
    p = patches(x_now[:, kept].astype(np.float64), kernel, list(a.get("pads", [0] * 4)),
                list(a.get("strides", [1, 1])))
    y = np.moveaxis(y_orig, 1, -1).astype(np.float64, order="C").reshape(-1, w.shape[0])
    orig_inits = {t.name: t for t in original.graph.initializer}
    bn = target.batchnorm
    weight = gamma = None
    if bn is not None and bn_var is not None:
        # fit in the BN's output space: an output the BN scales down matters less there
        gamma = tensor_array(inits[bn.input[1]]).astype(np.float64)
        eps = next((x.f for x in bn.attribute if x.name == "epsilon"), 1e-5)
        weight = gamma ** 2 / (bn_var + eps)
    if shortcut_now is not None and shortcut_orig is not None:
        drift = np.moveaxis(shortcut_now - shortcut_orig, 1, -1).reshape(
            -1, w.shape[0]).astype(np.float64)
        if bn is None:  # a folded BN: the Conv's output is what the Add sums
            y = y - drift
        elif gamma is not None:  # the drift in the Conv's space: through the BN backwards
            safe = np.where(np.abs(gamma) > 1e-6 * np.abs(gamma).max(), gamma, np.inf)
            y = y - drift * np.sqrt(bn_var + eps) / safe
    w0 = w[:, kept].reshape(w.shape[0], -1).T
    fitted, c = ridge_fit(p, y, w0, lam, weight)
    new = np.zeros_like(w)
    new[:, kept] = fitted.T.reshape(w.shape[0], kept.size, *kernel)
    set_tensor_array(w_init, new.astype(tensor_array(w_init).dtype))
    # the fitted constant replaces whatever constant the layer had (bias and any BN-mean
    # offset absorbed earlier): y_orig already contains the original bias
    if len(node.input) > 2 and node.input[2]:
        b = inits[node.input[2]]
        set_tensor_array(b, c.astype(tensor_array(b).dtype))
        if bn is not None and bn.input[3] in orig_inits:
            mu = inits[bn.input[3]]
            set_tensor_array(mu, tensor_array(orig_inits[bn.input[3]]).astype(
                tensor_array(mu).dtype))
        return True
    assert bn is not None  # output_target guarantees a bias or a BN
    mu = inits[bn.input[3]]
    mu_orig = tensor_array(orig_inits[bn.input[3]]) if bn.input[3] in orig_inits \
        else tensor_array(mu)
    set_tensor_array(mu, (mu_orig.astype(np.float64) - c).astype(tensor_array(mu).dtype))
    return True
