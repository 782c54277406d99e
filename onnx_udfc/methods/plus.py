"""``udfc+``: UDFC carried further with a statistical model of the activations.

Pruning: each pruned channel's *post-activation* output ``x_j`` is reconstructed as
``sum_i s_i x_i + c_j`` from the kept channels by least squares on moments
(:mod:`onnx_udfc.moments.reconstruction`), the moments coming from the run's
:class:`~onnx_udfc.moments.source.MomentSource` (data-free: synthetic samples or the
propagation; measured on a calibration set when given). ``s`` goes into the next layers' input
columns exactly like Eq. 8; the constant ``c_j`` into their bias (or the BatchNorm mean that
follows them; a Conv/Gemm without either gets a bias).

Quantization: DFQ-style bias correction, ``E[(Wq - W) x] = (Wq - W) E[x]`` subtracted from each
quantized layer's output, with E[x] from the same moments (GPTQ rounding under them:
:mod:`onnx_udfc.quant.gptq_layer`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.channels.absorbers import (
    Absorber,
    ColumnView,
    absorbers,
    apply_reconstruction,
    channel_partition,
    channel_positions,
    producer_block,
    routes,
)
from onnx_udfc.channels.activations import activation_tensor, channel_axes, pruned_producers
from onnx_udfc.channels.analysis import ChannelAnalysis
from onnx_udfc.channels.stats import LayerWeights, follower_batchnorm, follower_bias, weight_layer
from onnx_udfc.core.blas import single_blas_thread
from onnx_udfc.core.io import set_tensor_array, tensor_array, tensor_dtype
from onnx_udfc.moments.input_range import InputRange
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.reconstruction import RIDGE, reconstruction
from onnx_udfc.moments.source import MomentSource
from onnx_udfc.quant.gptq_layer import MAX_INPUTS


@dataclass
class PlusConfig:
    """Hyperparameters of udfc+ (tuned on the NM ResNet-56 and LeNet-300-100 only)."""

    lam: float = RIDGE  # ridge, relative to the mean kept variance
    spatial: float = 0.5  # correlation between the positions of a patch (no BN to fit it)
    fit_spatial: bool = False  # fit it per layer to the BatchNorm's running variances
    absorb_constant: bool = True
    const_scale: float = 0.85  # shrink the absorbed constant toward 0
    bias_correction: bool = True
    scale_correction: bool = False  # LS scale per output channel, folded into a following BN
    input_range: InputRange | None = None  # of the image input (standardised when None)
    moments: str = "auto"  # what the user asked for (onnx_udfc.moments.source.MOMENTS)
    sequential: bool = False  # onnx_udfc.methods.sequential
    seed: int = 0  # of the synthetic samples (and the inversion's start)
    seq_lam: float = 0.01
    seq_const_scale: float = 1.0
    seq_limit: int = 256  # calibration inputs used by the sequential fit
    seq_output: bool = True  # refit plain Conv absorbers on patches (onnx_udfc.methods.output_fit)
    gptq: bool = True  # round weights with error feedback (onnx_udfc.quant.gptq) under the moments
    gptq_max_inputs: int = MAX_INPUTS
    # --moments inverted: the fitted batch (onnx_udfc.moments.inverted), set once per run
    samples: Any = field(default=None, compare=False, repr=False)


DEFAULT = PlusConfig()


def moment_source(model: onnx.ModelProto, cfg: PlusConfig, calibration: Any = None,
                  input_shapes: dict[str, list[int]] | None = None,
                  sequential_pruning: bool = False, pruning: bool = True) -> MomentSource:
    """The run's moment source with udfc+'s settings (measured on ``calibration`` if given;
    ``input_shapes``: the run's working shapes of dynamic inputs; ``sequential_pruning``: whether
    the run removes channels and repairs them with the sequential fit, which ``auto``
    reads; ``pruning``: whether it removes channels at all, which the proxy crops' fit
    needs)."""
    return MomentSource(model, cfg.moments, calibration=calibration, seed=cfg.seed,
                        samples=cfg.samples, input_range=cfg.input_range, spatial=cfg.spatial,
                        fit_spatial=cfg.fit_spatial, input_shapes=input_shapes,
                        sequential_pruning=sequential_pruning, pruning=pruning)


F = TypeVar("F", bound=Callable[..., Any])


def plus_threads(cfg_arg: str) -> Callable[[F], F]:
    """Decorate a stage so that it runs on one BLAS thread when its ``cfg_arg`` (a config
    with a ``method``) selects ``udfc+`` (see :func:`single_blas_thread`)."""
    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            cfg = sig.bind_partial(*args, **kwargs).arguments.get(cfg_arg)
            if getattr(cfg, "method", None) != "udfc+":
                return fn(*args, **kwargs)
            with single_blas_thread():
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def add_output_bias(ctx: ChannelAnalysis, layer: LayerWeights, delta: np.ndarray) -> bool:
    """Add ``delta`` (per output channel) to the layer's output, before any BN: to its bias, a
    following BN's mean, or the constant of the Add a MatMul exports its bias as (when nothing
    else reads it); False if impossible (MatMul without bias)."""
    node, inits = layer.node, ctx.inits
    if layer.bias(inits) is not None:
        init = inits[node.input[2]]
        b = tensor_array(init)
        set_tensor_array(init, (b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype))
        return True
    outputs = {o.name for o in ctx.graph.output}
    bn = follower_batchnorm(node, ctx.consumers, outputs)
    if bn is not None and bn.input[3] in inits and inits[bn.input[3]] is not None:
        init = inits[bn.input[3]]
        mu = tensor_array(init)
        set_tensor_array(init, (mu.astype(np.float64) - delta).astype(mu.dtype))
        return True
    added = follower_bias(node, ctx.consumers, inits, outputs)
    if added is not None:  # MatMul + Add: the Add's constant is the layer's bias
        add = added[0]
        name = next(n for n in add.input if n != node.output[0])
        if all(r is add for r in ctx.consumers.get(name, [])):
            init = inits[name]
            c = tensor_array(init)
            step = -delta if add.op_type == "Sub" else delta
            set_tensor_array(init, (c.astype(np.float64) + step.reshape(c.shape)).astype(c.dtype))
            return True
    if node.op_type not in ("Conv", "Gemm"):
        return False
    dtype = tensor_dtype(inits[layer.weight])
    name = f"{layer.weight}__udfc_bias"
    while name in inits:
        name += "_"
    t = numpy_helper.from_array(delta.astype(dtype), name)
    ctx.graph.initializer.append(t)
    ctx.inits[name] = ctx.graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    return True


def absorb_constants(ctx: ChannelAnalysis, found: list[Absorber], pruned_cls: np.ndarray,
                     const: np.ndarray) -> list[str]:
    """Fold ``sum_j c_j W'[:, j]`` (over all positions/taps of channel j) into each absorber's
    output bias. Returns the absorbers that could not take it."""
    skipped = []
    for ab in found:
        pp = channel_positions(ctx, ab.tensor, pruned_cls)
        if pp is None:
            skipped.append(ab.layer.node.name)
            continue
        w = ColumnView(ctx, ab).by_output
        cols = w[pp.reshape(-1)].reshape(pp.shape[0], pp.shape[1], w.shape[1], -1)
        taps = tap_coverage(ctx, ab) if cols.shape[3] > 1 else None
        if taps is not None and taps.size == cols.shape[3]:
            cols = cols * taps
        delta = np.einsum("j,jmor->o", const, cols)
        if not add_output_bias(ctx, ab.layer, delta):
            skipped.append(ab.layer.node.name)
    return skipped


def tap_coverage(ctx: ChannelAnalysis, ab: Absorber) -> np.ndarray | None:
    """For a Conv or ConvTranspose absorber: the share of output positions each kernel tap
    writes to from a real (not padded) input, flattened like the kernel; a constant input is
    then reproduced exactly on average over the positions. A Conv's output position sums every
    tap (shares near 1); a ConvTranspose spreads each input over its taps, so an output
    position takes about ``kernel / stride`` of them (shares near ``1 / stride``)."""
    node = ab.layer.node
    shape = ctx.shapes.get(node.input[0])
    w = ctx.inits[node.input[1]]
    if node.op_type not in ("Conv", "ConvTranspose") or shape is None or len(shape) < 3:
        return None
    kernel = [int(d) for d in w.dims[2:]]
    spatial = shape[2:]
    if not all(isinstance(d, int) for d in spatial) or len(spatial) != len(kernel):
        return None
    nd = len(kernel)
    a = {x.name: x for x in node.attribute}
    if "auto_pad" in a and a["auto_pad"].s not in (b"NOTSET", b""):
        return None
    pads = list(a["pads"].ints) if "pads" in a else [0] * 2 * nd
    strides = list(a["strides"].ints) if "strides" in a else [1] * nd
    dil = list(a["dilations"].ints) if "dilations" in a else [1] * nd
    extra = list(a["output_padding"].ints) if "output_padding" in a else [0] * nd
    cover = np.ones(1)
    for ax in range(nd):
        size, k, pb, st, d = spatial[ax], kernel[ax], pads[ax], strides[ax], dil[ax]
        if node.op_type == "Conv":
            n_out = (size + pb + pads[ax + nd] - d * (k - 1) - 1) // st + 1
            pos = np.arange(n_out)[:, None] * st - pb + np.arange(k)[None, :] * d
            frac = ((pos >= 0) & (pos < size)).mean(0)
        else:  # output position of input i through tap t: i * stride - pad + t * dilation
            n_out = (size - 1) * st - pb - pads[ax + nd] + d * (k - 1) + extra[ax] + 1
            pos = np.arange(size)[:, None] * st - pb + np.arange(k)[None, :] * d
            frac = ((pos >= 0) & (pos < n_out)).sum(0) / max(n_out, 1)
        cover = np.outer(cover, frac).reshape(-1)
    return cover


def plus_pruning(ctx: ChannelAnalysis, p: Any, found: list[Absorber], cls: np.ndarray,
                 kept: np.ndarray, pruned: np.ndarray, moments: dict[str, TensorMoments],
                 cfg: PlusConfig | None = None) -> dict[str, Any]:
    """Reconstruct producer ``p``'s pruned channels (original indices) from its kept ones,
    once per route to the absorbers (:func:`~onnx_udfc.channels.absorbers.routes`)."""
    cfg = cfg or DEFAULT
    entries = []
    for via, group in routes(found):
        t = activation_tensor(p.node, ctx, via)
        m = producer_moments(ctx, t, cls, moments.get(t))
        if m is None:
            entries.append({"compensated": False, "reason": f"no moments for '{t}'"})
            continue
        coef, const, rel = partitioned_reconstruction(
            m, kept, pruned, cfg.lam, channel_partition(ctx, group, cls))
        skipped = apply_reconstruction(ctx, group, cls[kept], cls[pruned], coef)
        entry: dict[str, Any] = {"compensated": not skipped, "stats": "moments",
                                 "predicted_error": float(np.mean(np.sqrt(rel))),
                                 "absorbers": [a.layer.node.name for a in group],
                                 "degenerate": []}
        if cfg.absorb_constant and not skipped:
            missed = absorb_constants(ctx, group, cls[pruned], cfg.const_scale * const)
            if missed:
                entry["constant_skipped"] = missed
        if skipped:
            entry["reason"] = f"channels missing from the input of {', '.join(skipped)}"
        entries.append(entry)
    return merge_routes(entries)


def partitioned_reconstruction(m: TensorMoments, kept: np.ndarray, pruned: np.ndarray,
                               lam: float, labels: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~onnx_udfc.moments.reconstruction.reconstruction` within each set of channels
    that share a label (:func:`~onnx_udfc.channels.absorbers.channel_partition`: a grouped
    Conv absorber reads each group on its own); coefficients across labels are zero."""
    if np.all(labels == labels[0]):
        return reconstruction(m, kept, pruned, lam)
    coef = np.zeros((pruned.size, kept.size))
    const, rel = np.zeros(pruned.size), np.zeros(pruned.size)
    for label in np.unique(labels[pruned]):
        k, q = np.flatnonzero(labels[kept] == label), np.flatnonzero(labels[pruned] == label)
        coef[np.ix_(q, k)], const[q], rel[q] = reconstruction(m, kept[k], pruned[q], lam)
    return coef, const, rel


def producer_moments(ctx: ChannelAnalysis, tensor: str, classes: np.ndarray,
                     m: TensorMoments | None) -> TensorMoments | None:
    """The moments of ``classes`` within ``m``, the moments of ``tensor`` (see
    :func:`~onnx_udfc.channels.absorbers.producer_block`); None when they are not there."""
    if m is None:
        return None
    idx = producer_block(ctx, tensor, classes)
    if idx is None:
        return m if m.mean.size == len(classes) else None
    if idx.size != len(classes) or idx.max() >= m.mean.size:
        return None
    cov = m.cov[idx] if m.diagonal else m.cov[np.ix_(idx, idx)]
    return TensorMoments(m.mean[idx], cov, m.hw)


def merge_routes(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One report entry for a producer rebuilt once per route: compensated when every route
    was, the mean predicted error, every absorber, the first reason of a route that failed."""
    if len(entries) == 1:
        return entries[0]
    out: dict[str, Any] = dict(entries[0])
    out["compensated"] = all(e["compensated"] for e in entries)
    errors = [e["predicted_error"] for e in entries if "predicted_error" in e]
    if errors:
        out["predicted_error"] = float(np.mean(errors))
    for key in ("absorbers", "degenerate", "constant_skipped", "output_refit"):
        merged = [x for e in entries for x in e.get(key, [])]
        if merged or key in out:
            out[key] = merged
    reasons = [e["reason"] for e in entries if "reason" in e]
    if reasons:
        out["reason"] = reasons[0]
    return out


def separate_tensors(ctx: ChannelAnalysis, removed: np.ndarray | None = None) -> list[str]:
    """The tensors udfc+ reconstructs at past a depthwise Conv (one per route through one,
    see :func:`~onnx_udfc.channels.absorbers.routes`; with ``removed``, per channel class,
    only of the producers that lose a channel)."""
    out = []
    for p in pruned_producers(ctx, removed):
        found, reason = absorbers(p.node, ctx, cross_channel=True, through_channel_separate=True)
        if reason is None:
            out += [activation_tensor(p.node, ctx, via) for via, _ in routes(found) if via]
    return out


def _patch_products(dims: list[int], layer: LayerWeights, f: np.ndarray, fq: np.ndarray,
                    m: TensorMoments, r: float, cross: bool = True
                    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray] | None:
    """``E[(w.x)(wq.x)]``, ``E[(wq.x)^2]`` and ``E[(wq - w).x]`` per output channel under
    the moment model (Conv patches: ``E[x x^T] (x) ((1 - r) I + r 11^T)``); ``cross=False``
    leaves the first two (products with the whole second moment) out as None."""
    node = layer.node
    if node.op_type == "Conv":
        group = int(next((a.i for a in node.attribute if a.name == "group"), 1))
        o = f.shape[0]
        cg = dims[1]
        if m.mean.size != cg * group or group != 1 and group != o:
            return None
        w3, q3 = f.reshape(o, cg, -1), fq.reshape(o, cg, -1)
        if group > 1:  # depthwise: each output channel sees one input channel
            idx = np.arange(o) // (o // group)
            mean = m.mean[idx] * (q3 - w3)[:, 0].sum(1)
            if not cross:
                return None, None, mean
            d = np.diag(m.second)[idx]

            def products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                ind = np.einsum("op,op->o", a[:, 0], b[:, 0])
                return d * ((1 - r) * ind + r * a[:, 0].sum(1) * b[:, 0].sum(1))
        else:
            mean = (q3 - w3).sum(2) @ m.mean
            if not cross:
                return None, None, mean
            sec = m.second

            def products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                ind = np.zeros(a.shape[0])
                for k in range(a.shape[2]):
                    ind += np.sum((a[:, :, k] @ sec) * b[:, :, k], axis=1)
                sa, sb = a.sum(2), b.sum(2)
                return (1 - r) * ind + r * np.sum((sa @ sec) * sb, axis=1)
        return products(w3, q3), products(q3, q3), mean
    if f.shape[1] != m.mean.size:
        return None
    if not cross:
        return None, None, (fq - f) @ m.mean
    sec = m.second
    return (np.sum((f @ sec) * fq, axis=1), np.sum((fq @ sec) * fq, axis=1),
            (fq - f) @ m.mean)


def bias_correction(ctx: ChannelAnalysis, layer: LayerWeights, f: np.ndarray, fq: np.ndarray,
                    moments: dict[str, TensorMoments], cfg: PlusConfig | None = None) -> bool:
    """Correct the quantized layer's output: with a following BatchNorm (and no bias) the
    least-squares scale ``s = E[y yq] / E[yq^2]`` goes into its gamma; then
    ``E[s yq - y]`` is removed from its output (bias, or the BN mean)."""
    cfg = cfg or DEFAULT
    m = moments.get(layer.node.input[0])
    if m is None:
        return False
    dims = [int(d) for d in ctx.inits[layer.weight].dims]
    if not cfg.scale_correction:
        err = _mean_out(dims, layer, fq - f, m)
        return err is not None and add_output_bias(ctx, layer, -err)
    outputs = {o.name for o in ctx.graph.output}
    bn = follower_batchnorm(layer.node, ctx.consumers, outputs)
    # the scale needs the products with the whole second moment (a [D, D] matmul per output
    # channel block); without a BN to take it only the mean error is used
    scaled = bn is not None and layer.bias(ctx.inits) is None \
        and all(n in ctx.inits for n in bn.input[1:5])
    prods = _patch_products(dims, layer, f, fq, m, cfg.spatial, cross=scaled)
    if prods is None:
        return False
    yyq, yqyq, err_mean = prods
    if scaled:
        assert bn is not None and yyq is not None and yqyq is not None
        scale = np.divide(yyq, yqyq, out=np.ones_like(yyq), where=yqyq > 0)
        scale = np.where((scale > 0.5) & (scale < 2.0), scale, 1.0)
        # y ~ s yq - delta, delta = E[s yq - y] = s (Wq - W) m + (s - 1) W m
        wm = _mean_out(dims, layer, f, m)
        if wm is None:
            return False
        delta = scale * err_mean + (scale - 1.0) * wm
        g_init, mu_init = ctx.inits[bn.input[1]], ctx.inits[bn.input[3]]
        g, mu = tensor_array(g_init), tensor_array(mu_init)
        set_tensor_array(g_init, (g.astype(np.float64) * scale).astype(g.dtype))
        set_tensor_array(mu_init, ((mu.astype(np.float64) + delta) / scale).astype(mu.dtype))
        return True
    return add_output_bias(ctx, layer, -err_mean)


def _mean_out(dims: list[int], layer: LayerWeights, f: np.ndarray,
              m: TensorMoments) -> np.ndarray | None:
    """``f . E[x]`` per output channel (None if the channels do not line up)."""
    if layer.node.op_type == "Conv":
        o = f.shape[0]
        w = f.reshape(o, dims[1], -1).sum(2)
        if w.shape[1] == m.mean.size:
            return w @ m.mean
        if w.shape[1] == 1 and o % m.mean.size == 0:  # depthwise
            return w[:, 0] * m.mean[np.arange(o) // (o // m.mean.size)]
        return None
    return f @ m.mean if f.shape[1] == m.mean.size else None


def quant_moments(model: onnx.ModelProto, ctx: ChannelAnalysis, source: MomentSource,
                  cfg: PlusConfig | None = None) -> dict[str, TensorMoments]:
    """Moments of the inputs of every weight layer (for the bias correction and GPTQ)."""
    cfg = cfg or DEFAULT
    if not cfg.bias_correction:
        return {}
    names = [n.input[0] for n in model.graph.node if weight_layer(n, ctx.inits) is not None]
    # the bias correction needs means only, which need variances only; GPTQ full covariances
    full = 512 if cfg.scale_correction or cfg.gptq else 0
    return source.moments(model, ctx.shapes, names, stage="quantize", max_full=full,
                          axes=channel_axes(ctx, names))
