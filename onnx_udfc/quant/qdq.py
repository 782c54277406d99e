"""Integer weight storage: each quantized weight becomes an integer initializer read by a
``DequantizeLinear`` whose output keeps the weight's name, so every consumer is untouched.

Fake quantization (``format="fake"``) leaves float weights that merely lie on a grid: the file
is as large as before. ``format="qdq"`` stores the quantizer's own codes, scales and zero
points (nothing is re-derived from floats, so the model computes what its fake twin computes,
up to float32 rounding of ``(q - zero_point) * scale``):

* symmetric grid -> int8 / int4 codes, no zero point (0 is the default);
  asymmetric grid -> uint8 / uint4 codes with their zero points;
* per tensor (opset >= 10), per output channel (``axis``, opset >= 13), block-wise along the
  input channels (``block_size``, opset >= 21);
* bits <= 4 -> int4/uint4 (opset >= 21, IR >= 10) unless ``container="int8"``; bits 5..8, or
  ``container="int8"``, -> an 8-bit container holding the narrower grid.

A model whose opset is too old is converted first with ``onnx.version_converter`` on a
weight-free skeleton (cheap at any size), and the converted graph must pass the full checker;
otherwise the request is refused before anything is written. The paper's Eq. 3 grid has no
zero level and no integer codes: it cannot be stored, only simulated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_udfc.config import QuantOptions, StorageOptions, container_type, needed_opset
from onnx_udfc.core.builder import unique_namer
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import _first_line, opset_version, tensor_array
from onnx_udfc.quant.grids import QuantizedWeight

_SKELETON_BYTES = 1024  # initializers larger than this leave the skeleton given to the converter


_TYPES = {"int8": (TensorProto.INT8, np.int8, -128, 127),
          "uint8": (TensorProto.UINT8, np.uint8, 0, 255),
          "int4": (TensorProto.INT4, np.int8, -8, 7),
          "uint4": (TensorProto.UINT4, np.uint8, 0, 15)}


def integer_tensor(name: str, values: np.ndarray, dtype: str) -> TensorProto:
    """An int8/uint8/int4/uint4 initializer; 4-bit values are packed two per byte (first
    element in the low nibble), which onnx-graphsurgeon cannot write."""
    kind, np_type, lo, hi = _TYPES[dtype]
    arr = np.asarray(values)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise UdfcError(f"'{name}': codes {arr.min()}..{arr.max()} do not fit {dtype}")
    if kind in (TensorProto.INT8, TensorProto.UINT8):
        return numpy_helper.from_array(arr.astype(np_type), name)
    nib = arr.reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, kind, list(arr.shape), packed.tobytes(), raw=True)


def _copy_fields(src, dst, skip: tuple[str, ...] = ()) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        target = getattr(dst, fd.name)
        if hasattr(target, "extend"):
            target.extend(value)
        elif hasattr(target, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def convert_opset(model: onnx.ModelProto, target: int, why: str
                  ) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """``model`` at opset ``target`` via ``onnx.version_converter``, full-checked, and the
    graph outputs whose declared shape had to be corrected
    (:func:`_convert_declaring_computed_outputs`).

    The converter and the checker see a skeleton whose large initializers are typed graph
    inputs (no data): converting a 100 MiB model costs milliseconds and models above
    protobuf's 2 GiB limit convert too. The weights are put back by name afterwards.
    """
    from onnx import version_converter

    current = opset_version(model)
    sk = onnx.ModelProto()
    _copy_fields(model, sk, ("graph",))
    _copy_fields(model.graph, sk.graph, ("initializer",))
    big: set[str] = set()
    inputs = {i.name for i in model.graph.input}  # old IRs list initializers as inputs too
    for init in model.graph.initializer:
        if init.ByteSize() > _SKELETON_BYTES:
            if init.name not in inputs:
                sk.graph.input.append(helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
            big.add(init.name)
        else:
            sk.graph.initializer.append(init)
    head = f"cannot convert the model from opset {current} to {target} ({why} needs it)"
    redeclared: list[dict[str, str]] = []
    try:
        try:
            conv = version_converter.convert_version(sk, target)
            onnx.checker.check_model(conv, full_check=True)
        except Exception as refused:  # noqa: BLE001  retried once, then named below
            if "existing shape differ in rank" not in str(refused):
                raise
            try:
                conv, redeclared = _convert_declaring_computed_outputs(sk, target)
                onnx.checker.check_model(conv, full_check=True)
            except Exception:  # noqa: BLE001  the first refusal is the one to name
                raise refused from None
    except Exception as exc:
        raise UdfcError(f"{head}: onnx {onnx.__version__} fails: {_first_line(exc)}") from None
    out = onnx.ModelProto()
    _copy_fields(conv, out, ("graph",))
    # The converter's shape inference leaves value_info for every tensor: only bytes on disk.
    _copy_fields(conv.graph, out.graph, ("initializer", "input", "value_info"))
    out.graph.value_info.extend(model.graph.value_info)
    out.graph.input.extend(i for i in conv.graph.input if i.name not in big or i.name in inputs)
    originals = {t.name: t for t in model.graph.initializer}
    kept = {i.name for i in conv.graph.input}
    for init in model.graph.initializer:
        if init.name in big:
            if init.name not in kept:
                raise UdfcError(f"{head}: the converter dropped weight '{init.name}'")
            out.graph.initializer.append(originals[init.name])
    out.graph.initializer.extend(conv.graph.initializer)
    out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(
        list(out.opset_import), ignore_unknown=True))
    _same_outputs(model, out, head)
    return out, redeclared


def _convert_declaring_computed_outputs(skeleton: onnx.ModelProto, target: int
                                        ) -> tuple[onnx.ModelProto, list[dict[str, str]]]:
    """The conversion again, for graph outputs declared with another rank than the graph
    computes (ddddocr's recogniser declares ``[1, seqlen]`` for a ``[T, 1, K]`` tensor): ONNX
    Runtime ignores the declaration, the converter's shape inference refuses it. Converted
    without output shapes, each output gets back its declaration, or, where the converted
    graph computes another rank, the computed shape; each such change is returned for the
    report, never made silently."""
    from onnx import version_converter

    bare = onnx.ModelProto()
    bare.CopyFrom(skeleton)
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    conv = version_converter.convert_version(bare, target)
    computed = {v.name: v.type.tensor_type for v in
                onnx.shape_inference.infer_shapes(conv, data_prop=True).graph.output}
    changes = []
    for out, declared in zip(conv.graph.output, skeleton.graph.output, strict=True):
        found, before = computed.get(out.name), declared.type.tensor_type
        out.type.tensor_type.CopyFrom(before)
        if found is not None and found.HasField("shape") and before.HasField("shape") \
                and len(found.shape.dim) != len(before.shape.dim):
            out.type.tensor_type.shape.CopyFrom(found.shape)
            changes.append({"output": out.name, "declared": _dims_text(before.shape),
                            "computed": _dims_text(found.shape)})
    if not changes:
        raise UdfcError("no graph output is declared with another rank than it is computed")
    return conv, changes


def _dims_text(shape: onnx.TensorShapeProto) -> str:
    return "[" + ", ".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                           for d in shape.dim) + "]"


def _same_outputs(original: onnx.ModelProto, converted: onnx.ModelProto, head: str) -> None:
    """Run both in ONNX Runtime on one random input and refuse any difference.

    The checker only sees types and shapes: onnx 1.23's converter moves GroupNormalization
    from opset 18 to 21 without rewriting its per-group scale into the per-channel one the new
    version expects, and the result passes the full checker. Models ONNX Runtime cannot run
    in the first place (custom ops) or cannot hold in one protobuf are not compared.
    """
    from onnx_udfc.core.io import PROTOBUF_LIMIT, approx_size
    from onnx_udfc.core.ort import make_inputs, run, session

    if approx_size(original) > PROTOBUF_LIMIT:
        return
    try:
        before = session(original, optimize=False)
        feed, _ = make_inputs(original, batch=1)
        want = run(before, feed)
    except Exception:
        return
    try:
        got = run(session(converted, optimize=False), feed)
    except Exception as exc:
        why = _first_line(exc).removeprefix("ONNX Runtime cannot load the model: ")
        raise UdfcError(f"{head}: ONNX Runtime cannot run the converted model ({why})") \
            from None
    for a, b in zip(want, got, strict=True):
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale):
            raise UdfcError(f"{head}: onnx's converter changed the model's outputs")


def _codes_in_weight_layout(qw: QuantizedWeight, shape: tuple[int, ...]) -> dict[str, Any]:
    """Codes, scale, zero point and DequantizeLinear attributes in the weight's ONNX layout."""
    r = qw.result
    moved = (shape[qw.out_axis],) + tuple(d for i, d in enumerate(shape) if i != qw.out_axis)
    q = np.moveaxis(np.asarray(r.q).reshape(moved), 0, qw.out_axis)
    scale, zp = np.asarray(r.scale), None if r.zero_point is None else np.asarray(r.zero_point)
    if zp is not None and not zp.any():
        zp = None  # an omitted zero point is 0 of the codes' type: bytes saved
    attrs: dict[str, int] = {}
    if r.block_size:
        # Moved axis 1 (input channels) is the first weight axis other than the output axis.
        attrs["axis"] = 0 if qw.out_axis != 0 else 1
        attrs["block_size"] = int(r.block_size)
        scale = np.moveaxis(scale, 0, qw.out_axis)
        zp = None if zp is None else np.moveaxis(zp, 0, qw.out_axis)
    elif r.axis is not None:
        attrs["axis"] = qw.out_axis
    return {"q": q, "scale": scale, "zero_point": zp, "attrs": attrs}


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               attrs: dict[str, int]) -> np.ndarray:
    """What ``DequantizeLinear`` computes, in float32 like ONNX Runtime."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.zeros_like(s, dtype=np.int32) if zero_point is None else \
        np.asarray(zero_point).astype(np.int32)
    axis = attrs.get("axis")
    if "block_size" in attrs:
        s = np.repeat(s, attrs["block_size"], axis=axis).take(range(q.shape[axis]), axis=axis)
        z = np.repeat(z, attrs["block_size"], axis=axis).take(range(q.shape[axis]), axis=axis)
    elif axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    if not z.any() and q.dtype.kind in "iu" and q.dtype.itemsize <= 2:
        # q - 0 is q, and 8/16-bit codes are exact in float32: the same products in one pass
        return np.multiply(q, s, dtype=np.float32)
    return (q.astype(np.int32) - z).astype(np.float32) * s


def _consumers(graph: onnx.GraphProto, names: set[str], found: dict[str, list]) -> None:
    for node in graph.node:
        for i in node.input:
            if i in names:
                found.setdefault(i, []).append(node)
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _consumers(g, names, found)


def _preflight(model: onnx.ModelProto, by_weight: dict[str, QuantizedWeight]) -> None:
    """Refuse weights that a DequantizeLinear cannot feed, with the reason."""
    inits = {t.name: t for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    readers: dict[str, list[onnx.NodeProto]] = {}
    _consumers(model.graph, set(by_weight), readers)
    for name in by_weight:
        init = inits.get(name)
        if init is None:
            raise UdfcError(f"weight '{name}' is no longer an initializer; cannot store it")
        if init.data_type != TensorProto.FLOAT:
            kind = TensorProto.DataType.Name(init.data_type).lower()
            raise UdfcError(f"weight '{name}' is {kind}: --format qdq stores float32 weights "
                            "only (DequantizeLinear's output takes the scale's type)")
        if name in inputs and model.ir_version >= 4:  # before IR 4 every weight is listed
            raise UdfcError(f"weight '{name}' is also a graph input (an overridable "
                            "initializer); a DequantizeLinear output cannot replace it")
        for node in readers.get(name, []):
            if node.domain not in ("", "ai.onnx"):
                raise UdfcError(
                    f"weight '{name}' is read by '{node.name or node.op_type}' "
                    f"({node.domain}.{node.op_type}), a custom-domain op that may need a "
                    "constant weight; it cannot take a DequantizeLinear output")


def to_qdq(model: onnx.ModelProto, quantized: dict[str, QuantizedWeight],
           storage: StorageOptions, quant: QuantOptions
           ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model with integer weights, and a storage summary with one entry per layer.

    ``quantized`` maps node names to what :func:`onnx_udfc.methods.compensate.quantize_model` kept.
    The float weights in ``model`` must still be the quantizer's dequantized values (checked
    to float32 rounding): integer storage writes codes, so a weight changed after
    quantization would silently differ from the fake model.
    """
    by_weight = {qw.weight: qw for qw in quantized.values()}
    before = opset_version(model)
    if not by_weight:  # every layer excluded: nothing to store, no reason to convert
        return model, dict(fake_summary(model, {}), format="qdq")
    _preflight(model, by_weight)
    need, why = needed_opset(storage, quant, min(qw.result.bits for qw in by_weight.values()))
    target = storage.opset if storage.opset is not None else max(before, need)
    if target < before:
        raise UdfcError(f"target opset {target} is older than the model's opset {before}; "
                        "only upgrades are supported")
    inits = {t.name: t for t in model.graph.initializer}
    layers: dict[str, dict[str, Any]] = {}
    plans: dict[str, dict[str, Any]] = {}
    for name, qw in by_weight.items():
        current = tensor_array(inits[name])
        plan = _codes_in_weight_layout(qw, current.shape)
        deq = dequantize(plan["q"], plan["scale"], plan["zero_point"], plan["attrs"])
        if not _holds(current, deq):
            raise UdfcError(f"weight '{name}' no longer holds the quantizer's values (changed "
                            "after quantization); it cannot be stored as integers")
        plan["dtype"] = container_type(storage, qw.result.bits, qw.result.scheme)
        plans[name] = plan
    redeclared: list[dict[str, str]] = []
    if target > before:
        model, redeclared = convert_opset(model, target, why)
    graph = model.graph
    fresh = unique_namer({t.name for t in graph.initializer}
                         | {o for n in graph.node for o in n.output}
                         | {i.name for i in graph.input} | {n.name for n in graph.node})

    new_inits, dq_nodes = [], {}
    for w, plan in plans.items():
        q_name, s_name = fresh(f"{w}_quantized"), fresh(f"{w}_scale")
        tensors = [integer_tensor(q_name, plan["q"], plan["dtype"]),
                   numpy_helper.from_array(plan["scale"].astype(np.float32), s_name)]
        inputs = [q_name, s_name]
        if plan["zero_point"] is not None:
            z_name = fresh(f"{w}_zero_point")
            tensors.append(integer_tensor(z_name, plan["zero_point"], plan["dtype"]))
            inputs.append(z_name)
        new_inits.extend(tensors)
        dq_nodes[w] = helper.make_node("DequantizeLinear", inputs, [w],
                                       name=fresh(f"{w}_DequantizeLinear"), **plan["attrs"])
        plan["bytes"] = sum(_stored_bytes(t) for t in tensors)
    # Delete by index (untouched weights are never copied), then append the integer ones.
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in plans]):
        del graph.initializer[i]
    graph.initializer.extend(new_inits)
    for i in reversed([i for i, v in enumerate(graph.input) if v.name in plans]):
        del graph.input[i]  # IR < 4 lists weights as inputs; the IR is raised below
    nodes = []
    for node in graph.node:
        for i in node.input:
            if i in dq_nodes:
                nodes.append(dq_nodes.pop(i))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    nodes[:0] = dq_nodes.values()  # weights read only inside subgraphs
    del graph.node[:]
    graph.node.extend(nodes)
    ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, ir, 10 if target >= 21 else 0)
    for node_name, qw in quantized.items():
        plan = plans[qw.weight]
        r = qw.result
        layers[node_name] = {
            "format": "qdq", "dtype": plan["dtype"], "bits": r.bits, "scheme": r.scheme,
            "axis": plan["attrs"].get("axis"), "block_size": plan["attrs"].get("block_size"),
            "zero_point": plan["zero_point"] is not None, "bytes": plan["bytes"],
            "float_bytes": int(np.prod(plan["q"].shape)) * 4}
    counts: dict[str, int] = {}
    for entry in layers.values():
        counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    summary = {"format": "qdq", "opset_before": before, "opset_after": target,
               "ir_version": model.ir_version, "weights": counts, "layers": layers}
    if redeclared:
        summary["outputs_redeclared"] = redeclared
    return model, summary


def _holds(weight: np.ndarray, dequantized: np.ndarray) -> bool:
    """Whether the weight still holds the quantizer's values, to float32 rounding. Equal is
    the rule: one pass, before the six of the tolerance."""
    if np.array_equal(weight, dequantized):
        return True
    tol = 4 * np.spacing(np.maximum(np.abs(weight), np.abs(dequantized)).astype(np.float32))
    return bool(np.all(np.abs(dequantized - weight) <= tol))


def _stored_bytes(t: TensorProto) -> int:
    return len(t.raw_data) if t.raw_data else t.ByteSize()


def fake_summary(model: onnx.ModelProto, quantized: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """The storage summary of a fake-quantized model: float weights on an integer grid."""
    layers = {n: {"format": "fake", "dtype": "float32", "bits": qw.result.bits,
                  "scheme": qw.result.scheme} for n, qw in quantized.items()}
    op = opset_version(model)
    return {"format": "fake", "opset_before": op, "opset_after": op,
            "ir_version": model.ir_version, "weights": {"float32": len(layers)} if layers else {},
            "layers": layers}
