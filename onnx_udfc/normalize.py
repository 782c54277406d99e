"""Graph normalisation that the analysis relies on, and the optional BatchNorm folding pass.

``normalize`` is behaviour-preserving: weights held in ``Constant`` nodes or behind ``Identity``
nodes become plain initializers, and small constant subgraphs (the shape arithmetic exporters
emit, e.g. the channel pads of an 'option A' ResNet shortcut) are evaluated into initializers so
that every index the channel analysis needs is a literal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.io import set_tensor_array, tensor_array

# Ops never folded: random, or with side information the reference evaluator cannot honour.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "If", "Loop", "Scan", "DequantizeLinear"}
FOLD_LIMIT = 1 << 16  # elements: larger results stay as computed by the runtime


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn every tensor-valued ``Constant`` node into an initializer. Returns the count."""
    g = model.graph
    keep, moved = [], 0
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute):
            value = _constant_value(node)
            if value is not None:
                g.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        keep.append(node)
    if moved:
        _replace_repeated(g.node, keep)
    return moved


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants stay as they are


def bypass_identities(model: onnx.ModelProto) -> int:
    """Make consumers of ``Identity(initializer)`` read the initializer directly."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    if alias:
        for node in keep:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
        _replace_repeated(g.node, keep)
    return len(alias)


def fold_constants(model: onnx.ModelProto, limit: int = FOLD_LIMIT) -> int:
    """Evaluate nodes whose inputs are all initializers and whose result is small."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    values = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(values)
    opsets = {o.domain: o.version for o in model.opset_import}
    keep, folded = [], 0
    for node in g.node:
        ins = [n for n in node.input if n]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and all(n in values and n not in graph_inputs for n in ins)
            and all(int(np.prod(values[n].dims)) <= limit for n in ins)
        )
        if foldable:
            try:
                ev = ReferenceEvaluator(node, opsets={"": opsets.get("", 17)})
                results = ev.run(None, {n: tensor_array(values[n]) for n in ins})
            except Exception:
                results = None
            if results is not None and all(
                    isinstance(r, np.ndarray) and r.size <= limit for r in results):
                for name, arr in zip(node.output, results, strict=False):
                    if name:
                        t = numpy_helper.from_array(np.asarray(arr), name)
                        g.initializer.append(t)
                        values[name] = t
                folded += 1
                continue
        keep.append(node)
    if folded:
        _replace_repeated(g.node, keep)
    return folded


def remove_dead(model: onnx.ModelProto) -> int:
    """Drop nodes and initializers nothing reads (graph outputs count as reads)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs read outer names implicitly
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    needed.update(_subgraph_reads(sub))
    removed = len(g.node) - len(keep)
    if removed:
        _replace_repeated(g.node, list(reversed(keep)))
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        removed += len(g.initializer) - len(inits)
        _replace_repeated(g.initializer, inits)
    return removed


def _replace_repeated(field, items: list) -> None:
    """Replace a repeated message field's content with ``items`` (a subset, same order).

    Elements are moved, not copied: a 100 MB initializer list must not be duplicated.
    """
    keep_ids = {id(x) for x in items}
    for i in range(len(field) - 1, -1, -1):
        if id(field[i]) not in keep_ids:
            del field[i]


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names.update(_subgraph_reads(sub))
    return names


def normalize(model: onnx.ModelProto) -> dict[str, int]:
    """All behaviour-preserving normalisations, in order. Returns counts per step."""
    counts = {"constants": constants_to_initializers(model),
              "identities": bypass_identities(model),
              "folded": fold_constants(model)}
    counts["removed"] = remove_dead(model)
    return counts


@dataclass
class BatchNormStats:
    """The statistics of a BatchNormalization that was folded into its producer."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


def fold_batchnorm(model: onnx.ModelProto) -> dict[str, BatchNormStats]:
    """Fold each BatchNormalization that directly follows a Conv or Gemm into it.

    Returns the folded statistics keyed by the producer node's name, so that later stages (the
    UDFC solver) keep gamma, beta, mean and var although the graph no longer has them.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    stats: dict[str, BatchNormStats] = {}
    drop = set()
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        src = producers.get(bn.input[0])
        if src is None or src.op_type not in ("Conv", "Gemm") or readers.get(bn.input[0]) != 1 \
                or bn.input[0] in outputs or not all(n in inits for n in bn.input[1:5]):
            continue
        if src.op_type == "Gemm" and _attr(src, "transA", 0):
            continue
        if src.input[1] not in inits or (len(src.input) > 2 and src.input[2]
                                         and src.input[2] not in inits):
            continue
        gamma, beta, mean, var = (tensor_array(inits[n]).astype(np.float64)
                                  for n in bn.input[1:5])
        eps = float(_attr(bn, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        w_init = inits[src.input[1]]
        w = tensor_array(w_init).astype(np.float64)
        if src.op_type == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif _attr(src, "transB", 0):
            w = w * scale[:, None]
        else:
            w = w * scale[None, :]
        bias = np.zeros_like(scale)
        if len(src.input) > 2 and src.input[2]:
            bias = np.broadcast_to(tensor_array(inits[src.input[2]]), scale.shape).astype(
                np.float64)
        new_bias = (bias - mean) * scale + beta
        if readers.get(src.input[1], 0) > 1:
            raise ValueError(f"weight '{src.input[1]}' is shared; folding BN would change "
                             "another node")
        set_tensor_array(w_init, w.astype(np.float32))
        bias_name = f"{src.name or src.output[0]}.bias_folded"
        g.initializer.append(numpy_helper.from_array(new_bias.astype(np.float32), bias_name))
        while len(src.input) < 3:
            src.input.append("")
        src.input[2] = bias_name
        src.output[0] = bn.output[0]
        stats[src.name or src.output[0]] = BatchNormStats(gamma, beta, mean, var, eps)
        drop.add(id(bn))
    if drop:
        _replace_repeated(g.node, [n for n in g.node if id(n) not in drop])
        remove_dead(model)
    return stats


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
