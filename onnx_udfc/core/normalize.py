"""Graph normalisation that the analysis relies on, and the optional BatchNorm folding pass.

``normalize`` is behaviour-preserving: weights held in ``Constant`` nodes or behind ``Identity``
nodes become plain initializers, and small constant subgraphs (the shape arithmetic exporters
emit, e.g. the channel pads of an 'option A' ResNet shortcut) are evaluated into initializers so
that every index the channel analysis needs is a literal. A graph whose nodes are out of
topological order is sorted first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.affine import fold_channel_affine
from onnx_udfc.core.graph_edit import cleanup, keep_only, toposort
from onnx_udfc.core.graph_index import GraphIndex
from onnx_udfc.core.io import set_tensor_array, sync_initializer_inputs, tensor_array

# Ops never folded: random, or with side information the reference evaluator cannot honour.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "If", "Loop", "Scan", "DequantizeLinear"}
FOLD_LIMIT = 1 << 16  # elements: larger results stay as computed by the runtime
_LAYOUT = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity"}


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
        keep_only(g.node, keep)
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
        keep_only(g.node, keep)
    return len(alias)


def fold_constants(model: onnx.ModelProto, limit: int = FOLD_LIMIT) -> int:
    """Evaluate nodes whose inputs are all initializers and whose result is small."""
    g = model.graph
    values = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(values)
    opsets = {o.domain: o.version for o in model.opset_import}
    elem_types = {v.name: v.type.tensor_type.elem_type
                  for v in [*g.input, *g.value_info, *g.output]
                  if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    keep, folded = [], 0
    for node in g.node:
        ins = [n for n in node.input if n]
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and len(ins) == 2 \
                and ins[0] in values and ins[1] not in values and elem_types.get(ins[1]) \
                and int(np.prod(values[ins[0]].dims)) <= limit:
            # A constant cast to an activation's type (dynamo's zero biases) is a constant.
            to = onnx.helper.tensor_dtype_to_np_dtype(elem_types[ins[1]])
            t = numpy_helper.from_array(tensor_array(values[ins[0]]).astype(to), node.output[0])
            g.initializer.append(t)
            values[node.output[0]] = t
            folded += 1
            continue
        # Layout ops only relabel a constant (a Caffe2 export reshapes its Gemm weight at
        # run time): folded whatever its size, since the result is no larger.
        layout = node.op_type in _LAYOUT and len(ins) > 0
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NO_FOLD
            and all(n in values and n not in graph_inputs for n in ins)
            and all(int(np.prod(values[n].dims)) <= limit for n in ins[layout:])
        )
        if foldable:
            from onnx.reference import ReferenceEvaluator  # on use: 0.05 s, rarely needed

            try:
                ev = ReferenceEvaluator(_node_model(node, values, opsets))
                results = ev.run(None, {n: tensor_array(values[n]) for n in ins})
            except Exception:
                results = None
            if results is not None and all(
                    isinstance(r, np.ndarray) and (r.size <= limit or layout) for r in results):
                for name, arr in zip(node.output, results, strict=False):
                    if name:
                        t = numpy_helper.from_array(np.asarray(arr), name)
                        g.initializer.append(t)
                        values[name] = t
                folded += 1
                continue
        keep.append(node)
    if folded:
        keep_only(g.node, keep)
    return folded


def _node_model(node: onnx.NodeProto, values: dict[str, onnx.TensorProto],
                opsets: dict[str, int], arrays: dict[str, np.ndarray] | None = None
                ) -> onnx.ModelProto:
    """One node as a model with the graph's opset: a bare NodeProto is evaluated at the newest
    opset, which rejects or misreads the attribute forms of old ones (Unsqueeze-1 ``axes``,
    Clip-6 ``min``/``max``, ...)."""
    def elem(n: str) -> int:
        if n in values:
            return values[n].data_type
        return onnx.helper.np_dtype_to_tensor_dtype((arrays or {})[n].dtype)

    ins = [onnx.helper.make_tensor_value_info(n, elem(n), None)
           for n in dict.fromkeys(i for i in node.input if i)]
    outs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = onnx.helper.make_graph([node], "fold", ins, outs)
    return onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])


# Ops that make up exporters' shape arithmetic; evaluated on small integer tensors only.
_SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast",
              "Add", "Sub", "Mul", "Div", "Floor", "Ceil", "Neg", "Abs", "Min", "Max", "Mod",
              "Reshape", "Identity", "Equal", "Where", "ReduceProd", "ReduceSum", "Sqrt"}
_PROBE_BATCHES = (1_000_003, 1_000_033)  # two primes standing in for a dynamic batch


def _probe_types(model: onnx.ModelProto) -> list[dict[str, onnx.TypeProto]] | None:
    """Graph input and initializer types, with each input's dynamic batch fixed to each probe
    value (one set without a dynamic batch); None when other input dims are dynamic.

    Types for ONNX shape inference, not probe outputs: nothing here for onnx-graphsurgeon
    (it infers no shapes), and the initializer types come straight off the raw protos."""
    from onnx_udfc.core.io import graph_inputs

    g = model.graph
    base = {t.name: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
            for t in g.initializer}
    runs = [dict(base) for _ in _PROBE_BATCHES]
    dynamic = False
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not inp.type.HasField("tensor_type") or not tt.HasField("shape") or \
                any(d is None for d in dims[1:]):
            return None
        dynamic |= bool(dims) and dims[0] is None
        for run, batch in zip(runs, _PROBE_BATCHES, strict=True):
            run[inp.name] = onnx.helper.make_tensor_type_proto(
                tt.elem_type, [batch if d is None else d for d in dims])
    return runs if dynamic else runs[:1]


def _dims(t: onnx.TypeProto | None) -> list[int] | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
    return None if any(d is None for d in dims) else dims


def fold_shape_arithmetic(model: onnx.ModelProto, limit: int = 64) -> int:
    """Evaluate the exporters' shape arithmetic where it does not depend on the batch.

    With a dynamic batch axis, exporters read every size at run time (``x.size(1)`` ->
    Shape -> Gather -> Div ...), so channel splits (``chunk`` -> Slice) and views
    (``x.view(x.size(0), 2, -1, h, w)`` -> Reshape) hang on computed values although only the
    batch is dynamic. One pass over the graph per probe batch size infers every tensor's shape
    node by node, feeding the evaluated shape values to the next nodes' inference. Values equal
    under both probes become initializers; a Reshape target that differs only where it copies
    the input's batch becomes a constant with 0 ("copy") there. Returns the nodes changed.
    """
    from onnx.reference import ReferenceEvaluator

    probes = _probe_types(model)
    if probes is None:
        return 0
    g = model.graph
    opset_ids = list(model.opset_import)
    opsets = {o.domain: o.version for o in opset_ids}
    values = {t.name: t for t in g.initializer}
    runs: list[dict[str, np.ndarray]] = [{} for _ in probes]

    def known(name: str, k: int) -> np.ndarray | None:
        if name in values:
            t = values[name]
            return tensor_array(t) if int(np.prod(t.dims)) <= limit else None
        return runs[k].get(name)

    for node in g.node:
        ins = [n for n in node.input if n]
        for k, types in enumerate(probes):
            if node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx") and ins:
                out = None
                if node.op_type in ("Shape", "Size"):
                    dims = _dims(types.get(node.input[0]))
                    if dims is not None:
                        start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
                        sel = dims[start:None if end is None else int(end)]
                        out = np.asarray(sel if node.op_type == "Shape" else int(np.prod(dims)),
                                         dtype=np.int64)
                elif all(known(n, k) is not None for n in ins):
                    try:
                        ev = ReferenceEvaluator(_node_model(node, values, opsets, runs[k]))
                        out = ev.run(None, {n: known(n, k) for n in dict.fromkeys(ins)})[0]
                    except Exception:
                        out = None
                if isinstance(out, np.ndarray) and out.size <= limit:
                    runs[k][node.output[0]] = out
            try:
                schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1),
                                              node.domain)
                data = {n: numpy_helper.from_array(known(n, k), n) for n in ins
                        if known(n, k) is not None}
                inferred = onnx.shape_inference.infer_node_outputs(
                    schema, node, {n: types[n] for n in ins if n in types}, data,
                    opset_imports=opset_ids)
            except Exception:
                continue
            for name, t in inferred.items():
                types[name] = t
    keep, changed = [], 0
    for node in g.node:
        if node.op_type == "Reshape" and node.input[1] not in values and len(probes) > 1:
            target = _reshape_target(node, [_dims(p.get(node.input[0])) for p in probes],
                                     [_dims(p.get(node.output[0])) for p in probes])
            if target is not None:
                t = numpy_helper.from_array(target, f"{node.output[0]}_shape")
                g.initializer.append(t)
                values[t.name] = t
                node.input[1] = t.name
                changed += 1
        results = [r.get(node.output[0]) if node.output else None for r in runs]
        if node.op_type in _SHAPE_OPS and all(r is not None for r in results) and all(
                np.array_equal(results[0], r) for r in results[1:]):
            g.initializer.append(numpy_helper.from_array(np.asarray(results[0]), node.output[0]))
            changed += 1
            continue
        keep.append(node)
    if len(keep) != len(g.node):
        keep_only(g.node, keep)
    return changed


def _reshape_target(node: onnx.NodeProto, ins: list[list[int] | None],
                    outs: list[list[int] | None]) -> np.ndarray | None:
    """A constant Reshape target giving, in every probe run, the output shape inference found:
    static dims literally, the batch-dependent one as 0 (copy, when it is the input's own dim
    and ``allowzero`` is 0) or -1."""
    if any(d is None for d in ins + outs) or len({len(o) for o in outs}) != 1:
        return None
    allowzero = int(_attr(node, "allowzero", 0))
    target, free = [], 0
    for p in range(len(outs[0])):
        col = [o[p] for o in outs]
        if len(set(col)) == 1:
            if col[0] == 0 and not allowzero:
                return None
            target.append(col[0])
        elif not allowzero and all(p < len(i) and i[p] == c for i, c in zip(ins, col,
                                                                           strict=True)):
            target.append(0)
        else:
            free += 1
            target.append(-1)
    return np.asarray(target, dtype=np.int64) if free <= 1 else None


def normalize(model: onnx.ModelProto) -> dict[str, int]:
    """All behaviour-preserving normalisations, in order. Returns counts per step."""
    counts = {"constants": constants_to_initializers(model),
              "identities": bypass_identities(model)}
    # The passes below and the channel analysis read the nodes in order, and ONNX Runtime runs
    # a graph whose nodes are not sorted, so such a model can reach us.
    toposort(model)
    counts["folded"] = fold_constants(model)
    if any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        more = fold_shape_arithmetic(model)
        counts["folded"] += more + (fold_constants(model) if more else 0)
    counts["affine"] = fold_channel_affine(model)
    counts["removed"] = cleanup(model)
    sync_initializer_inputs(model)
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
    index = GraphIndex.of(g)
    inits, readers = index.inits, index.readers
    stats: dict[str, BatchNormStats] = {}
    drop = set()
    for bn, src in index.batchnorms(g):
        if src is None or src.op_type not in ("Conv", "Gemm") or not index.private(bn.input[0]) \
                or not all(n in inits for n in bn.input[1:5]):
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
        keep_only(g.node, [n for n in g.node if id(n) not in drop])
        cleanup(model)
        sync_initializer_inputs(model)
    return stats


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
