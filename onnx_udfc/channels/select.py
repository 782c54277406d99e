"""Choosing the channels to prune by how well the kept ones can stand in for them
(``--criterion recon``).

udfc+ replaces a pruned channel ``x_j`` by its least-squares reconstruction from the kept
channels (:func:`onnx_udfc.moments.reconstruction.reconstruction`). What reaches the next
layers is then ``W_P e_P`` with ``e_P = x_P - E[x_P | x_K]``, whose expected energy is

    E(P) = tr(M_PP S_P),   S_P = Sigma_PP - Sigma_PK Sigma_KK^-1 Sigma_KP = ((Sigma^-1)_PP)^-1

(the Schur complement: the conditional covariance of the pruned channels given the kept ones)
and ``M = sum_{o, taps} w_o w_o^T`` the Gram matrix of the next layers' input columns, each
output weighted by the BatchNorm gain that follows it. l1/l2 look at the producer's own
filters; this looks at what is lost *after* compensation. A channel that is large but nearly a
combination of others goes first; a small but unique one stays.

The pruned set grows greedily, one channel at a time, each time by the channel whose removal
raises ``E`` least; with rank-one updates of ``S_P`` and of ``S_P Lambda_P:`` a step costs
``O(|P| C)``. Every channel's score is the predicted error (relative to the channels' total
contribution ``tr(M Sigma)``) at the step it was removed, so scores are monotone along the
greedy order and comparable between producers of one group (Concat)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_udfc.channels.absorbers import Absorber, absorbers, channel_positions
from onnx_udfc.channels.activations import activation_tensor
from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.channels.stats import follower_batchnorm
from onnx_udfc.core.io import tensor_array
from onnx_udfc.moments import proxy
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.reconstruction import RIDGE
from onnx_udfc.moments.source import folded_export


def resolve_criterion(requested: str, method: str, moments_kind: str,
                      model: onnx.ModelProto,
                      input_shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """The criterion ``requested`` stands for: ``auto`` is ``recon`` when udfc+ (``method``)
    prunes a convolutional graph that folded its BatchNorms
    (:func:`~onnx_udfc.moments.source.folded_export`) with moments (``moments_kind``) measured
    on the user's calibration data or on the proxy photographs of an image input: l1 sees
    BN-scaled filters there, while the reconstruction error reads activations and the next
    layers' columns, which folding leaves alone (``docs/results/data_free.md``). Else ``l1``
    (an MLP has no BN folded into it: nothing was measured there; on a BN-kept network recon
    gained on the fitted noise with crops but its greedy removal costs minutes on wide
    layers, fifth round)."""
    if requested != "auto":
        return requested
    read = moments_kind == "measured" or (
        moments_kind == "proxy" and proxy.not_image_cause(model, input_shapes) is None)
    convolutional = any(n.op_type in ("Conv", "ConvTranspose") for n in model.graph.node)
    folded = convolutional and folded_export(model)
    return "recon" if method == "udfc+" and read and folded else "l1"


def greedy_removal(cov: np.ndarray, gram: np.ndarray, ridge: float = RIDGE
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy order in which to remove channels so that ``tr(M_PP S_P)`` grows least.

    ``cov``: channel covariance ``Sigma [C, C]``; ``gram``: ``M [C, C]`` (PSD);
    ``ridge``: added to the diagonal relative to the mean variance (the same shrinkage the
    reconstruction uses). Returns ``(order [C], error after each removal [C])``; the last
    channel's removal leaves nothing to reconstruct it from and costs ``M_jj Sigma_jj``."""
    c = cov.shape[0]
    d = float(np.mean(np.diag(cov))) if c else 0.0
    reg = cov + (ridge * d + 1e-12 * max(d, 1e-30)) * np.eye(c)
    lam = np.linalg.inv(reg)
    lam = (lam + lam.T) / 2
    m = (gram + gram.T) / 2
    order: list[int] = []
    errors: list[float] = []
    free = np.ones(c, dtype=bool)
    b = np.zeros((0, 0))  # S_P = (Lambda_PP)^-1
    # Rows for the removed channels P, filled in removal order: S_P Lambda_P,: (u),
    # M_PP S_P Lambda_P,: (v) and the rows of Lambda and M they read. Updated in place, so a
    # step costs a few passes over |P| x C instead of new arrays (vstack, fancy-index copies)
    # each time: the same operations on the same values, so the same bits.
    u_rows, v_rows, lam_rows, m_rows, outer = (np.empty((c, c)) for _ in range(5))
    lam_diag, m_diag = np.diag(lam), np.diag(m)
    total = 0.0
    for k in range(c):
        p = np.asarray(order, dtype=np.int64)
        u_all, v_all = u_rows[:k], v_rows[:k]
        s = lam_diag - np.einsum("pc,pc->c", lam_rows[:k], u_all)
        gain = (np.einsum("pc,pc->c", u_all, v_all) - 2 * np.einsum("pc,pc->c", m_rows[:k], u_all)
                + m_diag)
        inc = np.where(free & (s > 0), gain / np.where(s > 0, s, 1.0), np.inf)
        j = int(np.argmin(inc))
        if not np.isfinite(inc[j]):
            break
        u = u_all[:, j].copy()  # S_P Lambda_Pj, read before u_all changes
        r = (lam[j] - lam[j, p] @ u_all) / s[j]  # new last row of S Lambda
        mu = m[np.ix_(p, p)] @ u if p.size else np.zeros(0)
        m_pj = m[p, j]
        step = outer[:k]
        u_all -= np.multiply(u[:, None], r[None, :], out=step)
        u_rows[k] = r
        v_all -= np.multiply(mu[:, None], r[None, :], out=step)
        v_all += np.multiply(m_pj[:, None], r[None, :], out=step)
        v_rows[k] = m[j, p] @ u_all + m[j, j] * r
        lam_rows[k], m_rows[k] = lam[j], m[j]
        b_new = np.empty((p.size + 1, p.size + 1))
        b_new[:-1, :-1] = b + np.outer(u, u) / s[j]
        b_new[:-1, -1] = b_new[-1, :-1] = -u / s[j]
        b_new[-1, -1] = 1.0 / s[j]
        b = b_new
        total += max(float(inc[j]), 0.0)
        order.append(j)
        errors.append(total)
        free[j] = False
    rest = np.flatnonzero(free)
    for j in rest[np.argsort(np.diag(cov)[rest] * np.diag(m)[rest], kind="stable")]:
        total += float(np.diag(cov)[j] * m[j, j])
        order.append(int(j))
        errors.append(total)
    return np.asarray(order, dtype=np.int64), np.asarray(errors)


def absorber_gram(ctx: ChannelAnalysis, found: list[Absorber], classes: np.ndarray
                  ) -> np.ndarray | None:
    """``M [C, C]`` over the producer's channels ``classes``: the Gram matrix of the
    absorbers' input columns (all taps and positions of a channel), each output scaled by the
    gain of the BatchNorm that follows it. None when a channel is missing from an absorber."""
    outputs = {o.name for o in ctx.graph.output}
    gram = np.zeros((len(classes), len(classes)))
    for ab in found:
        pp = channel_positions(ctx, ab.tensor, classes)
        if pp is None:
            return None
        w = tensor_array(ctx.inits[ab.layer.weight]).astype(np.float64)
        w = np.moveaxis(w, (ab.layer.in_axis, ab.layer.out_axis), (0, 1))
        gain = np.ones(w.shape[1])
        bn = follower_batchnorm(ab.layer.node, ctx.consumers, outputs)
        if bn is not None and all(n in ctx.inits for n in (bn.input[1], bn.input[4])):
            eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
            g = tensor_array(ctx.inits[bn.input[1]]).astype(np.float64)
            v = tensor_array(ctx.inits[bn.input[4]]).astype(np.float64)
            if g.shape == gain.shape:
                gain = g / np.sqrt(v + eps)
        w = w.reshape(w.shape[0], w.shape[1], -1) * gain[None, :, None]
        cols = w[pp.reshape(-1)].reshape(pp.shape[0], pp.shape[1], -1)  # channel, pos, rest
        gram += np.einsum("imr,jmr->ij", cols, cols)
    return gram


def reconstruction_scores(ctx: ChannelAnalysis, moments: dict[str, TensorMoments],
                          base: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, list[str]]:
    """Per class, the predicted relative error at the greedy step that removes it
    (:func:`greedy_removal`); classes of producers that cannot be scored (coupled, no
    moments, no absorber) keep ``base`` (l1/l2) ranked after every scored one of their group.
    Returns the scores and the producers that fell back, with the reason."""
    root = ctx.roots()
    owners = np.bincount(root[np.concatenate([p.slots for p in ctx.producers])]
                         if ctx.producers else np.zeros(0, np.int64), minlength=len(root))
    scores = 1.0 + base / (base.max() if base.size and base.max() > 0 else 1.0)
    fallback: list[str] = []
    for p in ctx.producers:
        cls = root[p.slots]
        name = p.node.name or p.tensor
        m = moments.get(activation_tensor(p.node, ctx))
        if (owners[cls] > 1).any() or len(np.unique(cls)) != len(cls):
            continue  # coupled: l1/l2 (such groups are fixed unless --prune-coupled)
        if m is None or m.mean.size != len(cls) or m.diagonal:
            fallback.append(f"{name}: no channel covariance")
            continue
        found, reason = absorbers(p.node, ctx, cross_channel=True)
        gram = absorber_gram(ctx, found, cls) if reason is None and found else None
        if gram is None:
            fallback.append(f"{name}: {reason or 'no absorber'}")
            continue
        order, err = greedy_removal(m.full, gram, ridge)
        total = float(np.trace(gram @ m.full)) or 1.0
        scores[cls[order]] = np.minimum(err / total, 1.0)
    return scores, fallback
