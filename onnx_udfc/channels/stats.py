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
  :meth:`onnx_udfc.methods.equations.ChannelStats.folded`); a Gemm/MatMul gets identity statistics
  (gamma = 1, sigma = 1, beta = bias), so Eq. 12 is the plain filter + bias fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_udfc.core.io import tensor_array
from onnx_udfc.core.normalize import BatchNormStats
from onnx_udfc.methods.equations import ChannelStats
from onnx_udfc.ops.base import attr
from onnx_udfc.ops.registry import op_spec


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
