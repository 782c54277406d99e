"""Data-free samples by model inversion (``--moments inverted``): inputs optimised until every
BatchNormalization sees, on the batch, the mean and variance it recorded on the training data.

The pink-noise samples of :mod:`onnx_udfc.moments.sampled` get each BN's *output* marginals right by
normalising with batch statistics, but what flows between the channels is still noise shaped by
the weights. Here the inputs themselves are fitted, as in DeepInversion (Yin et al., CVPR 2020)
and ZeroQ (Cai et al., CVPR 2020): minimise over the batch ``x``, split into ``G`` groups
``x_g`` of about 16 samples,

    L(x) = 1/G sum_g sum_BN ||mu_BN(x_g) - running_mean||_2 + ||var_BN(x_g) - running_var||_2
           + w CE(logits(x), i mod K),

with Adam. Holding every small group (not just the whole batch) to the statistics keeps a few
samples from carrying the batch's moments for the rest, and the cross-entropy to an assigned
class per sample (DeepInversion's class prior; only where the first output is ``[N, K]``
logits or their softmax) gives the deep layers class-like rather than generic texture. On the
NM ResNet-56 (4-bit l1, ``--sequential``, 50 % pruning) the two together reach 80.2 +- 0.5 %
top-1 over four seeds against 79.4 with the batch loss alone; each alone stayed within the
seed noise, and at 30-40 % nothing changed beyond it.

The gradient comes from ONNX Runtime: :func:`inversion_model` appends to the
network's own graph the reverse pass of the ops on the way to the BatchNorms (Conv by
ConvTranspose with the same weights, BN and activations by their elementwise derivatives, Add
by fan-out, pooling and shape ops by their transposes, Gemm/MatMul by the transposed weight),
so no autodiff library is needed. An op without a rule here stops the gradient (its inputs
get none from it), which only leaves the samples less fitted; the count of such ops is
reported.

The fitted batch then replaces the pink noise for the moments, the BN re-anchoring included
(:func:`onnx_udfc.moments.sampled.sampled_moments`), and for ``--sequential``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.input_shapes import pin_inputs
from onnx_udfc.core.io import graph_inputs, opset_version
from onnx_udfc.moments.reverse import Builder, backward

STEPS = 300
LEARNING_RATE = 0.1
EPS = 1e-8
GROUP_SIZE = 16  # samples per group held to the BN statistics
CLASS_WEIGHT = 1.0  # cross-entropy to the assigned classes, next to the BN distance
CLASS_PRIOR_PROP = "udfc_inversion_logits"  # metadata: which tensor the class prior acts on


@dataclass
class Inversion:
    """The fitted batch and how the fit went."""

    feed: dict[str, np.ndarray]
    loss_start: float
    loss_end: float
    steps: int
    batchnorms: int
    stopped: list[str] = field(default_factory=list)  # op types the gradient could not cross
    seconds: float = 0.0
    groups: int = 1
    class_prior: bool = False  # the cross-entropy to assigned classes was part of the loss

    def summary(self) -> dict:
        return {"steps": self.steps, "batchnorms": self.batchnorms, "groups": self.groups,
                "class_prior": self.class_prior,
                "loss_start": self.loss_start, "loss_end": self.loss_end,
                "gradient_stopped_at": sorted(set(self.stopped)), "seconds": self.seconds}


def _static_shapes(model: onnx.ModelProto, batch: int,
                   input_shapes: dict[str, list[int]] | None = None
                   ) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` with the batch fixed, dynamic input sizes set to ``input_shapes``
    and every tensor's inferred static shape."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    pin_inputs(fixed, input_shapes or {})
    del fixed.graph.value_info[:]
    for vi in list(graph_inputs(fixed)) + list(fixed.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(fixed)
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(
            inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    return fixed, shapes


def group_count(batch: int, size: int = GROUP_SIZE) -> int:
    """How many groups of about ``size`` samples the batch is split into (a divisor of it)."""
    want = max(1, batch // max(size, 1))
    return next(g for g in range(want, 0, -1) if batch % g == 0)


def _bn_loss(b: Builder, node: onnx.NodeProto, shape: list[int], groups: int
             ) -> tuple[str, str]:
    """(loss term, its gradient with respect to the BN input). The batch is viewed as
    ``groups`` groups ``[G, N/G, C, ...]``; every group is held to the running statistics and
    the terms are averaged over the groups."""
    x, mean, var = node.input[0], node.input[3], node.input[4]
    rank = len(shape)
    grouped = [groups, shape[0] // groups, *shape[1:]]
    xg = b.op("Reshape", [x, b.const(np.asarray(grouped, np.int64), "gshape")])
    axes = [1, *range(3, rank + 1)]
    count = float(np.prod([grouped[a] for a in axes]))
    bshape = b.const(np.asarray([1, 1, -1] + [1] * (rank - 2), np.int64), "bshape")
    mu = b.reduce("ReduceMean", xg, axes)
    xc = b.op("Sub", [xg, mu])
    v = b.reduce("ReduceMean", b.op("Mul", [xc, xc]), axes)
    eps = b.const(np.asarray(EPS, np.float32), "eps")
    terms, coeffs = [], []
    for stat, target in ((mu, mean), (v, var)):
        d = b.op("Sub", [stat, b.op("Reshape", [target, bshape])])
        norm = b.op("Sqrt", [b.op("Add", [b.reduce("ReduceSum", b.op("Mul", [d, d]),
                                                     list(range(1, rank + 1))), eps])])
        terms.append(b.reduce("ReduceSum", norm, list(range(rank + 1)), 0))
        coeffs.append(b.op("Div", [d, norm]))
    scale = b.const(np.asarray(1.0 / groups, np.float32))
    loss = b.op("Mul", [b.op("Add", terms), scale], "bnloss")
    g_mu = b.op("Mul", [coeffs[0], b.const(np.asarray(1.0 / (count * groups), np.float32))])
    g_var = b.op("Mul", [coeffs[1], b.const(np.asarray(2.0 / (count * groups), np.float32))])
    grad = b.op("Add", [b.op("Mul", [xc, g_var]), g_mu])
    return loss, b.op("Reshape", [grad, b.const(np.asarray(shape, np.int64))], "bngrad")


def _class_logits(graph: onnx.GraphProto, shapes: dict) -> str | None:
    """The classifier's logits: the first output when it is ``[N, K]`` (the input of a final
    Softmax / LogSoftmax), else None."""
    if not graph.output:
        return None
    name = graph.output[0].name
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax"):
        name = producer.input[0]
    shape = shapes.get(name)
    return name if shape is not None and len(shape) == 2 and shape[1] >= 2 else None


def has_class_output(model: onnx.ModelProto,
                     input_shapes: dict[str, list[int]] | None = None) -> bool:
    """Whether the class prior can act on ``model``: its first output is ``[N, K]`` logits or
    their softmax (``input_shapes``: the working shapes of dynamic inputs)."""
    fixed, shapes = _static_shapes(model, 2, input_shapes)
    return _class_logits(fixed.graph, shapes) is not None


def _class_loss(b: Builder, logits: str, shape: list[int], weight: float
                ) -> tuple[str, str]:
    """``weight`` times the cross-entropy of the logits to the labels ``i mod K`` (sample i):
    every class gets its share of the batch (DeepInversion's class prior). Returns (loss, its
    gradient ``weight (softmax - onehot) / N``)."""
    n, k = shape
    onehot = np.zeros((n, k), np.float32)
    onehot[np.arange(n), np.arange(n) % k] = 1.0
    target = b.const(onehot, "onehot")
    scale = b.const(np.asarray(weight / n, np.float32))
    logp = b.op("LogSoftmax", [logits], axis=1)
    ce = b.reduce("ReduceSum", b.op("Mul", [logp, target]), [0, 1], 0)
    loss = b.op("Mul", [b.op("Neg", [ce]), scale], "celoss")
    grad = b.op("Mul", [b.op("Sub", [b.op("Softmax", [logits], axis=1), target]), scale])
    return loss, grad


def inversion_model(model: onnx.ModelProto, batch: int, group_size: int = GROUP_SIZE,
                    class_weight: float = CLASS_WEIGHT,
                    input_shapes: dict[str, list[int]] | None = None,
                    class_only: bool = False) -> tuple[onnx.ModelProto, str, int, list[str]]:
    """``model`` with the batch fixed to ``batch`` and two more outputs: the BN-statistics
    loss (``udfc_inversion_loss``) and its gradient with respect to the first float input.
    ``class_only``: a graph without BatchNorm statistics is fitted to the class prior alone
    (:func:`onnx_udfc.moments.proxy.fitted_inputs`). Returns (model, input name, number
    of BatchNorms in the loss, op types that stopped the gradient)."""
    fixed, shapes = _static_shapes(model, batch, input_shapes)
    inits = {t.name: t for t in fixed.graph.initializer}
    inputs = [i for i in graph_inputs(fixed)
              if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not inputs:
        raise UdfcError("model inversion needs a float input")
    x = inputs[0].name
    b = Builder(opset_version(fixed))
    forward = list(fixed.graph.node)
    groups = group_count(batch, group_size)
    grads: dict[str, list[str]] = {}
    losses = []
    for node in forward:
        if (node.op_type == "BatchNormalization" and len(node.input) >= 5
                and all(n in inits for n in node.input[1:5]) and node.input[0] in shapes):
            loss, g = _bn_loss(b, node, shapes[node.input[0]], groups)
            losses.append(loss)
            grads.setdefault(node.input[0], []).append(g)
    if not losses and not class_only:
        raise UdfcError("model inversion needs BatchNormalization layers with statistics")
    batchnorms = len(losses)
    logits = _class_logits(fixed.graph, shapes) if class_weight > 0 else None
    if not losses and logits is None:
        raise UdfcError("no BatchNormalization statistics and no [N, K] class output to fit")
    if logits is not None:
        loss, g = _class_loss(b, logits, shapes[logits], class_weight)
        losses.append(loss)
        grads.setdefault(logits, []).append(g)
        fixed.metadata_props.add(key=CLASS_PRIOR_PROP, value=logits)
    stopped = []
    for node in reversed(forward):
        out = [g for o in node.output for g in grads.get(o, [])]
        if not out or not node.input:
            continue
        dy = out[0] if len(out) == 1 else b.op("Sum", out, "gsum")
        if any(grads.get(o) for o in node.output[1:]):
            stopped.append(node.op_type)
            continue
        got = backward(b, node, dy, shapes, inits)
        if got is None:
            stopped.append(node.op_type)
            continue
        for n, g in got.items():
            if n and n not in inits:
                grads.setdefault(n, []).append(g)
    gx = grads.get(x, [])
    if not gx:
        raise UdfcError("model inversion: no gradient reaches the input "
                        f"(stopped at {', '.join(sorted(set(stopped))) or 'nothing'})")
    total = losses[0] if len(losses) == 1 else b.op("Sum", losses, "loss")
    grad = gx[0] if len(gx) == 1 else b.op("Sum", gx, "gx")
    b.op("Identity", [total], output="udfc_inversion_loss")
    b.op("Identity", [grad], output="udfc_inversion_grad")
    # only what the two outputs need: gradients that ended at an op without a rule are dropped
    b.append_to(fixed.graph, ["udfc_inversion_loss", "udfc_inversion_grad"])
    del fixed.graph.output[:]
    fixed.graph.output.extend([
        helper.make_tensor_value_info("udfc_inversion_loss", onnx.TensorProto.FLOAT, []),
        helper.make_tensor_value_info("udfc_inversion_grad", onnx.TensorProto.FLOAT,
                                      shapes.get(x))])
    return fixed, x, batchnorms, stopped


_CACHE: dict[tuple, Inversion] = {}
CACHE_SIZE = 2


def cached_inverted_inputs(model: onnx.ModelProto, steps: int = STEPS, seed: int = 0,
                           progress: Callable[[int, int, float], None] | None = None,
                           input_shapes: dict[str, list[int]] | None = None) -> Inversion:
    """:func:`inverted_inputs`, remembered for the last ``CACHE_SIZE`` models: the fit is
    deterministic, and a benchmark compresses one model many times."""
    import hashlib

    key = (hashlib.sha256(model.SerializeToString()).hexdigest(), steps, seed,
           repr(sorted((input_shapes or {}).items())))
    if key not in _CACHE:
        while len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = inverted_inputs(model, steps, seed, progress=progress,
                                      input_shapes=input_shapes)
    return _CACHE[key]


def inverted_inputs(model: onnx.ModelProto, steps: int = STEPS, seed: int = 0,
                    learning_rate: float = LEARNING_RATE,
                    progress: Callable[[int, int, float], None] | None = None,
                    start: np.ndarray | None = None,
                    input_shapes: dict[str, list[int]] | None = None,
                    class_only: bool = False) -> Inversion:
    """Fit a batch of inputs to the BatchNorm statistics of ``model`` (module docstring),
    starting from ``start`` (by default the pink noise of :mod:`onnx_udfc.moments.sampled`: on the
    NM ResNet-56 it reaches after 300 steps a loss white noise does not reach in 600).
    ``class_only``: see :func:`inversion_model`."""
    from onnx_udfc.core.ort import refusals, session
    from onnx_udfc.core.precision import float32_copy
    from onnx_udfc.moments.sampled import synthetic_inputs

    model = float32_copy(model)  # the gradient graph is float32; the samples are cast on use
    first = next((i for i in graph_inputs(model)
                  if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT), None)
    if first is None:
        raise UdfcError("model inversion needs a float input")
    shapes = input_shapes or {}
    dims = list(shapes[first.name]) if first.name in shapes else [
        d.dim_value if d.HasField("dim_value") else 0 for d in first.type.tensor_type.shape.dim]
    if not dims or any(d <= 0 for d in dims[1:]):
        raise UdfcError(f"model inversion needs a static input shape, '{first.name}' has "
                        f"{dims}")
    began = time.perf_counter()
    if start is None:
        start = synthetic_inputs(model, seed, input_shapes=shapes)[first.name]
    x = np.asarray(start, np.float32)
    inv, name, count, stopped = inversion_model(model, len(x), input_shapes=shapes,
                                                class_only=class_only)
    sess = session(inv)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    beta1, beta2 = 0.9, 0.999
    first_loss = last = float("nan")
    for i in range(1, steps + 1):
        try:
            loss, g = sess.run(["udfc_inversion_loss", "udfc_inversion_grad"], {name: x})
        except refusals() as exc:
            raise UdfcError(f"model inversion runs a batch of {len(x)} images, which ONNX "
                            f"Runtime refuses ({str(exc).splitlines()[0][:160]}); the graph "
                            "likely fixes its batch size: use --moments sampled") from None
        last = float(loss)
        if i == 1:
            first_loss = last
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step = learning_rate * (m / (1 - beta1 ** i)) / (np.sqrt(v / (1 - beta2 ** i)) + 1e-8)
        x = (x - step).astype(np.float32)
        if progress is not None:
            progress(i, steps, last)
    if steps:
        last = float(sess.run(["udfc_inversion_loss"], {name: x})[0])
    prior = any(p.key == CLASS_PRIOR_PROP for p in inv.metadata_props)
    return Inversion({name: x}, first_loss, last, steps, count, stopped,
                     time.perf_counter() - began, group_count(len(x)), prior)
