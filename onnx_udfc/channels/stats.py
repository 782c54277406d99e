"""Per-channel statistics of a layer's outputs, read from the graph.

Three sources, in order of preference:

* a BatchNormalization directly after the layer (BN kept): gamma, beta, mean, var, eps, with
  the layer's own bias absorbed into the mean;
* statistics saved by :func:`onnx_udfc.core.normalize.fold_batchnorm` (``--fold-bn``): the layer's
  weight is now the BN-scaled filter R and its bias K, and Eq. 12 is exactly
  ``(sigma_j/gamma_j)^2 ||R_j - sum s_i R_i||^2 + alpha1 (K_j - sum s_i K_i)^2``, so the saved
  ``(sigma/gamma)^2`` is passed as the per-channel loss weight: the paper, unchanged;
* nothing (BN folded by the exporter, or a Linear without BN): a Conv is taken as BN-folded
  (weight R, bias K, per-channel loss weight ``1/||R_j||^2``, see
  :meth:`ChannelStats.folded`); a Gemm/MatMul gets identity statistics
  (gamma = 1, sigma = 1, beta = bias), so Eq. 12 is the plain filter + bias fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import ArrayLike

from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.normalize import BatchNormStats
from onnx_udfc.ops.base import attr
from onnx_udfc.ops.registry import op_spec


def finite_vector(a: ArrayLike, name: str, n: int | None = None) -> np.ndarray:
    """``a`` flattened to float64; ValueError unless it has ``n`` entries (when given), all
    finite (``name`` names it in the message)."""
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if n is not None and v.size != n:
        raise ValueError(f"{name} has {v.size} entries, expected {n}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite")
    return v


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel affine map after layer l: ``y = gamma * (z - mean) / sigma + beta``.

    ``sigma = sqrt(var + eps)``. ``loss_weight`` (None for real BN and identity) replaces the
    paper's ``(sigma_j / gamma_j)^2`` in the pruning loss when gamma/sigma are not separable.
    ``kind`` is ``"batchnorm"``, ``"identity"`` or ``"folded"``.
    """

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float = 0.0
    kind: str = "batchnorm"
    loss_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = np.asarray(self.gamma).size
        for name in ("gamma", "beta", "mean", "var"):
            object.__setattr__(self, name, finite_vector(getattr(self, name), name, n))
        if self.loss_weight is not None:
            w = np.asarray(self.loss_weight, dtype=np.float64).reshape(-1)
            if w.size != n or np.any(np.isnan(w)) or np.any(w <= 0):
                raise ValueError("loss_weight must hold N positive weights (inf = undefined)")
            object.__setattr__(self, "loss_weight", w)
        if not np.all(self.var + self.eps > 0):
            raise ValueError("BatchNorm var + eps must be positive for every channel")

    @property
    def n(self) -> int:
        """Number of channels."""
        return int(self.gamma.size)

    @property
    def sigma(self) -> np.ndarray:
        """``sqrt(var + eps)``."""
        return np.sqrt(self.var + self.eps)

    @classmethod
    def from_batchnorm(
        cls, gamma: ArrayLike, beta: ArrayLike, mean: ArrayLike, var: ArrayLike,
        eps: float = 1e-5, conv_bias: ArrayLike | None = None,
    ) -> ChannelStats:
        """Stats of a BatchNorm following layer l. The layer's own bias b, if any, is absorbed
        as ``mean - b`` so every formula sees the BN of a bias-free layer (do not pass it again
        to :func:`folded_bias`)."""
        mean = finite_vector(mean, "mean")
        if conv_bias is not None:
            mean = mean - finite_vector(conv_bias, "conv_bias", mean.size)
        return cls(gamma, beta, mean, var, float(eps), "batchnorm")

    @classmethod
    def identity(cls, bias: ArrayLike) -> ChannelStats:
        """No BN: gamma = 1, mean = 0, var = 1, eps = 0 (so sigma = 1 exactly) and beta = bias;
        hence ``R_i = F_i``, ``K_i = bias_i`` and the pruning weight is 1 (paper literally)."""
        b = finite_vector(bias, "bias")
        one = np.ones_like(b)
        return cls(one, b, np.zeros_like(b), one, 0.0, "identity")

    @classmethod
    def folded(
        cls, bias: ArrayLike, filters: ArrayLike, weighting: str | ArrayLike = "relative"
    ) -> ChannelStats:
        """BN already folded into the layer: its weight is ``R`` and its bias is ``K``.

        The paper's loss is ``(sigma_j/gamma_j)^2 ||R_j - sum s_i R_i||^2 + alpha1 (...)^2``
        and that factor equals ``||W_j||^2 / ||R_j||^2`` (W_j: the raw pre-BN filter), which
        folding has erased. ``weighting`` chooses the replacement w_j:

        * ``"relative"`` (default): ``1/||R_j||^2``, exactly the paper if the raw filters had
          unit norm. Like the paper's factor, the filter term is then unchanged when channel
          j's output is rescaled, while the bias term scales with it. On the real ResNet-56
          (NM) and ResNet-20 BN checkpoints at 50% l1 pruning it was the closest to the
          paper's coefficients (per-layer relative difference: median 0.8% / 2%, worst
          12% / 6%; "layer": worst 206% / 6%; "unit": worst 1890% / 10%).
        * ``"unit"``: 1, exactly the paper if gamma/sigma = 1; the loss is then homogeneous,
          so scaling channel j scales its coefficients exactly.
        * ``"layer"``: ``1/mean_i ||R_i||^2``, as if raw norms were equal within the layer.
        * an array of N positive weights, e.g. ``(sigma/gamma)^2`` saved before folding,
          which reproduces the paper exactly.

        A zero filter under ``"relative"`` gets an infinite weight (its only minimiser is 0).
        """
        k = finite_vector(bias, "bias")
        n2 = np.sum(np.asarray(filters, dtype=np.float64).reshape(k.size, -1) ** 2, axis=1)
        choices = {
            "relative": lambda: np.divide(1.0, n2, out=np.full(k.size, np.inf), where=n2 > 0),
            "unit": lambda: np.ones(k.size),
            "layer": lambda: np.full(k.size, 1.0 / n2.mean() if n2.mean() > 0 else 1.0),
        }
        if isinstance(weighting, str) and weighting not in choices:
            raise ValueError(f"weighting must be one of {', '.join(choices)} or an array")
        w = choices[weighting]() if isinstance(weighting, str) else weighting
        one = np.ones_like(k)
        return cls(one, k, np.zeros_like(k), one, 0.0, "folded", w)

    def pruning_weights(self) -> np.ndarray:
        """Per-channel weight w_j of the filter term (inf where the loss is undefined)."""
        if self.loss_weight is not None:
            return self.loss_weight.copy()
        g2 = self.gamma**2
        return np.divide(self.var + self.eps, g2, out=np.full(self.n, np.inf), where=g2 > 0)


@dataclass
class LayerWeights:
    """A weight layer seen as ``[N outputs, D]`` filters, whatever its ONNX layout."""

    node: onnx.NodeProto
    weight: str  # initializer name
    out_axis: int  # axis of the weight that indexes output channels
    in_axis: int  # axis that indexes input channels (features)

    def filters(self, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
        w = tensor_array(inits[self.weight]).astype(np.float64)
        return np.moveaxis(w, self.out_axis, 0).reshape(w.shape[self.out_axis], -1)

    def bias(self, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
        n, layer = self.node, op_spec(self.node.op_type).layer
        i = None if layer is None else layer.bias_input
        if i is not None and len(n.input) > i and n.input[i] and n.input[i] in inits:
            return tensor_array(inits[n.input[i]]).astype(np.float64).reshape(-1)
        return None


def weight_layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> LayerWeights | None:
    """The weight layout of a layer with a constant weight (Conv, ConvTranspose, Gemm,
    MatMul: see their :class:`~onnx_udfc.ops.base.WeightLayer`)."""
    layer = op_spec(node.op_type).layer
    if layer is None or len(node.input) < 2 or node.input[1] not in inits:
        return None
    axes = layer.layout(node, inits)
    return None if axes is None else LayerWeights(node, node.input[1], *axes)


def follower_batchnorm(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                       outputs: set[str]) -> onnx.NodeProto | None:
    readers = consumers.get(node.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization" \
            and node.output[0] not in outputs:
        return readers[0]
    return None


def follower_bias(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                  inits: dict[str, onnx.TensorProto], outputs: set[str]
                  ) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The ``Add``/``Sub`` that adds a per-output-channel constant right after a weight layer
    (a Linear on 3-D input exports as MatMul + Add, the bias first or second), with the bias
    it adds. None when there is none or the constant does not line up with the channels."""
    readers = consumers.get(node.output[0], [])
    layer = weight_layer(node, inits)
    if len(readers) != 1 or layer is None or node.output[0] in outputs:
        return None
    add = readers[0]
    if add.op_type not in ("Add", "Sub") or len(add.input) != 2:
        return None
    other = [n for n in add.input if n != node.output[0]]
    if len(other) != 1 or other[0] not in inits or (add.op_type == "Sub"
                                                    and add.input[0] != node.output[0]):
        return None
    c = tensor_array(inits[other[0]]).astype(np.float64)
    w = inits[layer.weight]
    spec = op_spec(node.op_type).layer
    _, n = spec.channels(node, [int(d) for d in w.dims])
    from_right = spec.channel_axis_from_right(len(w.dims))
    if c.size != n or c.ndim < from_right or c.shape[c.ndim - from_right] != n:
        return None
    return add, (-c if add.op_type == "Sub" else c).reshape(-1)


def layer_stats(layer: LayerWeights, inits: dict[str, onnx.TensorProto],
                consumers: dict[str, list[onnx.NodeProto]], outputs: set[str],
                folded: dict[str, BatchNormStats] | None = None) -> tuple[ChannelStats, str]:
    """The layer's :class:`ChannelStats` and their source ('batchnorm', 'saved', 'folded',
    'identity')."""
    bias = layer.bias(inits)
    added = follower_bias(layer.node, consumers, inits, outputs)
    if added is not None:  # MatMul + Add: the Add holds the layer's bias
        bias = added[1] if bias is None else bias + added[1]
    bn = follower_batchnorm(layer.node, consumers, outputs)
    if bn is not None and all(n in inits for n in bn.input[1:5]):
        gamma, beta, mean, var = (tensor_array(inits[n]) for n in bn.input[1:5])
        return ChannelStats.from_batchnorm(gamma, beta, mean, var,
                                           float(attr(bn, "epsilon", 1e-5)), bias), "batchnorm"
    f = layer.filters(inits)
    n = f.shape[0]
    k = bias if bias is not None else np.zeros(n)
    saved = (folded or {}).get(layer.node.name or layer.node.output[0])
    if saved is not None and len(saved.gamma) == n and np.all(saved.gamma != 0):
        weight = (saved.var + saved.eps) / saved.gamma ** 2
        return ChannelStats.folded(k, f, weighting=weight), "saved"
    if op_spec(layer.node.op_type).layer.assume_folded:
        return ChannelStats.folded(k, f), "folded"
    return ChannelStats.identity(k), "identity"
