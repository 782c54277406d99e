"""Loading, saving and shape inference.

Models are handled as ``onnx.ModelProto`` and edited in place, so metadata, names, opsets and doc
strings survive untouched. Weights are read as zero-copy NumPy views where possible: with a
ResNet-50-size file the whole run must stay within a few times the file size in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_udfc.core.errors import UdfcError

MIN_OPSET = 9
# Protobuf refuses to serialise a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
SMALL_CONSTANT = 64  # elements: initializers at most this size travel into shape inference

ModelSource = str | os.PathLike | onnx.ModelProto
Shape = tuple[int | str | None, ...]


def load_model(source: ModelSource, *, check_finite: bool = True) -> onnx.ModelProto:
    """Load a model from a path (external data included) or pass a ``ModelProto`` through.

    Raises :class:`UdfcError` with one line for a missing, truncated or non-ONNX file, an empty
    graph, an opset below 9, undeclared op domains, missing external data or NaN/Inf weights.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
        origin = "model"
    else:
        path = Path(source)
        origin = str(path)
        if not path.exists():
            raise UdfcError(f"{path}: no such file")
        if path.is_dir():
            raise UdfcError(f"{path}: is a directory, not an ONNX file")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several unrelated types on garbage
            raise UdfcError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
        _load_external(model, path.parent, origin)
    _validate(model, origin)
    if check_finite:
        for init in model.graph.initializer:
            if init.data_type in _FLOAT_TYPES:
                arr = tensor_array(init)
                if arr.size and not np.isfinite(arr).all():
                    raise UdfcError(f"{origin}: weight '{init.name}' contains NaN or Inf values")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_external(model: onnx.ModelProto, base: Path, origin: str) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    needed = [t for t in model.graph.initializer if uses_external_data(t)]
    if not needed:
        return
    for t in needed:
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not (base / loc).is_file():
            raise UdfcError(f"{origin}: external data file '{loc}' for '{t.name}' is missing")
    try:
        load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise UdfcError(f"{origin}: cannot read external data ({_first_line(exc)})") from None


def _validate(model: onnx.ModelProto, origin: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise UdfcError(f"{origin}: not a valid ONNX model (no IR version or graph)")
    if len(model.graph.node) == 0:
        raise UdfcError(f"{origin}: the model's graph is empty")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    default = opsets.get("ai.onnx")
    if default is None:
        raise UdfcError(f"{origin}: the model declares no default-domain opset")
    if default < MIN_OPSET:
        raise UdfcError(f"{origin}: opset {default} is below the supported minimum {MIN_OPSET}")
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        if domain not in opsets:
            raise UdfcError(
                f"{origin}: node '{node.name or node.op_type}' uses op domain '{node.domain}' "
                "that the model does not declare"
            )


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for o in model.opset_import:
        if (o.domain or "") == domain or (domain == "" and o.domain == "ai.onnx"):
            return o.version
    return 0


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a read-only zero-copy view of ``raw_data`` when the layout allows."""
    if tensor.HasField("raw_data") and tensor.data_type in _RAW_DTYPES:
        dtype = _RAW_DTYPES[tensor.data_type]
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.INT64: np.dtype("<i8"),
    onnx.TensorProto.INT32: np.dtype("<i4"),
    onnx.TensorProto.INT8: np.dtype("i1"),
    onnx.TensorProto.UINT8: np.dtype("u1"),
}


def tensor_dtype(tensor: onnx.TensorProto) -> np.dtype:
    """The dtype of :func:`tensor_array`'s values, without reading them (reading ``raw_data``
    copies every byte)."""
    return _RAW_DTYPES.get(tensor.data_type) or tensor_array(tensor).dtype


def set_tensor_array(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in place, keeping its name, type and doc string."""
    new = numpy_helper.from_array(np.ascontiguousarray(array, dtype=tensor_dtype(tensor)),
                                  tensor.name)
    doc = tensor.doc_string
    tensor.Clear()
    tensor.CopyFrom(new)
    tensor.doc_string = doc


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_data: bool | None = None, source: str | os.PathLike | None = None,
               check: bool = False) -> Path:
    """Write atomically: everything goes to a temporary folder beside ``path``, then is moved.

    ``external_data=None`` chooses external data only when the model cannot fit in one protobuf
    (2 GiB). The data file is ``<name>.data`` next to the model. ``source`` guards against
    overwriting the input. ``check`` runs the full ``onnx.checker`` on the written file before
    it is moved into place (checking the file rather than the in-memory model keeps peak memory
    low), so a model that fails the checker never appears at ``path``.
    """
    out = Path(path)
    if source is not None and Path(source).exists() and out.exists() \
            and os.path.samefile(source, out):
        raise UdfcError(f"{out}: output path is the input model; choose another path")
    if out.is_dir():
        raise UdfcError(f"{out}: output path is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UdfcError(f"{out}: output directory '{parent}' does not exist")
    if external_data is None:
        external_data = approx_size(model) > PROTOBUF_LIMIT
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".udfc-", dir=parent))
    except OSError as exc:
        raise UdfcError(f"{out}: cannot write to '{parent}' ({exc.strerror})") from None
    try:
        tmp_model = tmpdir / out.name
        data_name = out.name + ".data"
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
            # save_as_external_data rewrote the in-memory tensors as references: load them back
            # so the caller's model stays usable.
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(tmpdir))
        else:
            with open(tmp_model, "wb") as fh:
                fh.write(model.SerializeToString())
        if check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as exc:
                raise UdfcError(f"output model fails onnx.checker: {_first_line(exc)}") \
                    from None
        if external_data and (tmpdir / data_name).exists():  # none when every tensor is small
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, out)
    except UdfcError:
        raise
    except (OSError, ValueError) as exc:
        raise UdfcError(f"{out}: cannot write model ({_first_line(exc)})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    if total > 64 * 2**20:  # weights are inline: nothing external worth parsing for
        return total
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    files = {e.value for t in model.graph.initializer for e in t.external_data
             if e.key == "location"}
    return total + sum((path.parent / f).stat().st_size for f in files
                       if (path.parent / f).is_file())


_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def approx_size(model: onnx.ModelProto) -> int:
    """Serialized size estimate from tensor dims alone.

    ``ModelProto.ByteSize()`` serialises the whole message internally with the upb backend,
    doubling peak memory on a large model; the weights dominate the size anyway. Weights held
    by Constant nodes (paddle2onnx exports every weight that way) count too.
    """
    total = 0
    constants = [a.t for n in model.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "value"]
    for t in [*model.graph.initializer, *constants]:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type in _PACKED_4BIT:  # two values per byte on disk
            total += (numel + 1) // 2 + 64
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize \
            if t.data_type != onnx.TensorProto.STRING else 16
        total += numel * itemsize + 64
    return total + 128 * len(model.graph.node) + 4096


def check_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """``onnx.checker`` with full check; uses the file when the model is too large for memory."""
    try:
        if path is not None and approx_size(model) > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise UdfcError(f"output model fails onnx.checker: {_first_line(exc)}") from None


def parse_input_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """Parse ``name:1x3x224x224`` strings (the CLI's ``--input-shape``)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise UdfcError(f"bad --input-shape '{spec}': expected NAME:DxDxD with positive "
                            "integers") from None
    return shapes


def check_input_shapes(model: onnx.ModelProto,
                       input_shapes: Mapping[str, Sequence[int]]) -> None:
    """``--input-shape`` values: each names a graph input, has its rank and keeps every
    static dim (batch included); it may only fix the dynamic ones."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in input_shapes.items():
        given = "x".join(str(d) for d in dims)
        if name not in inputs:
            raise UdfcError(f"--input-shape {name}:{given}: '{name}' is not an input of the "
                            f"model (its inputs: {', '.join(repr(n) for n in inputs)})")
        tensor = inputs[name].type.tensor_type
        if not tensor.HasField("shape"):
            continue  # no declared shape: the user gives the whole of it
        # exporters write -1 or 0 for a dynamic dim (paddle2onnx: [-1, 3, ?, ?])
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in tensor.shape.dim]
        model_shape = "x".join("?" if d is None else str(d) for d in declared)
        if len(declared) != len(dims):
            raise UdfcError(f"--input-shape {name}:{given}: rank {len(dims)} does not match "
                            f"the model's rank {len(declared)} ({model_shape})")
        for axis, (fixed, wanted) in enumerate(zip(declared, dims, strict=True)):
            if fixed is not None and fixed != wanted:
                raise UdfcError(f"--input-shape {name}:{given}: dim {axis} is {wanted} but the "
                                f"model fixes it to {fixed} ({model_shape}); only dynamic dims "
                                "can be set")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old IRs list initializers among the inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def sync_initializer_inputs(model: onnx.ModelProto) -> None:
    """Keep graph-input declarations of initializers in step with the initializers.

    IR < 4 (old opset-9 exports) requires every initializer to be declared as a graph input
    too. After a pass adds, drops or reshapes initializers, a stale declaration fails the
    checker (``Inferred shape and existing shape differ``); here every declaration of an
    initializer gets the initializer's type and dims and, for IR < 4, new initializers get one.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    declared = set()
    for inp in g.input:
        t = inits.get(inp.name)
        if t is None:
            continue
        declared.add(inp.name)
        tt = inp.type.tensor_type
        if tt.elem_type != t.data_type or not tt.HasField("shape") or \
                [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
                != list(t.dims):
            inp.type.CopyFrom(onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    if model.ir_version < 4:
        g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for name, t in inits.items() if name not in declared)


def infer_shapes(model: onnx.ModelProto,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 *, require_static: bool = True) -> dict[str, Shape]:
    """Shapes of every tensor, inferred on a weight-free skeleton of the model.

    The skeleton declares large initializers as typed inputs instead of carrying their data, so
    this costs little memory for any model size (also > 2 GiB). The batch dimension (first axis
    of a graph input) may stay symbolic; any other unknown input dimension is refused when
    ``require_static`` is set, because channel index maps and FLOPs need it.
    """
    g = model.graph
    overrides = dict(input_shapes or {})
    check_input_shapes(model, overrides)
    real_inputs = graph_inputs(model)
    sk = onnx.ModelProto()
    # IR < 4 ignores initializers that are not declared inputs, and the skeleton's are not.
    sk.ir_version = max(model.ir_version, 4)
    sk.opset_import.extend(model.opset_import)
    sg = sk.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.output.extend(g.output)
    # Shapes the exporter recorded stay known past ops that inference cannot see through
    # (custom domains).
    sg.value_info.extend(g.value_info)
    for inp in real_inputs:
        vi = sg.input.add()
        vi.CopyFrom(inp)
        if inp.name in overrides:
            dims = overrides[inp.name]
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for v in dims:
                shape.dim.add().dim_value = int(v)
    for init in g.initializer:
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if numel <= SMALL_CONSTANT or init.data_type in (onnx.TensorProto.INT64,
                                                         onnx.TensorProto.INT32):
            sg.initializer.append(init)
        else:
            sg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                               list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except Exception as exc:
        raise UdfcError(f"shape inference failed: {_first_line(exc)}") from None
    shapes: dict[str, Shape] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim
            )
    for init in g.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    if require_static:
        for inp in real_inputs:
            dims = shapes.get(inp.name)
            if dims is None:
                raise UdfcError(f"input '{inp.name}' has no shape; pass --input-shape")
            dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int) and i > 0]
            if dynamic:
                raise UdfcError(
                    f"input '{inp.name}' has dynamic dimension(s) {dynamic} "
                    f"(shape {list(dims)}); pass --input-shape {inp.name}:"
                    + "x".join("1" if not isinstance(d, int) else str(d) for d in dims)
                )
    return shapes
