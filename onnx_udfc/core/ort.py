"""ONNX Runtime plumbing: sessions, input feeds and batched runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnx_udfc.core import io
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import check_input_shapes, graph_inputs

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
              "tensor(bool)": np.bool_}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Only fatal messages: ORT logs a refused run as an error on the C-level stderr before raising
# it, and every refusal is already raised, caught and reported (fallback causes, UdfcError).
FATAL_ONLY = 4


def session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu",
            optimize: bool = True, threads: int = 0, config: dict[str, str] | None = None,
            exact_int4: bool = True):
    """An ONNX Runtime session; ``provider`` is 'cpu' or 'cuda' (needs onnxruntime-gpu).

    ``threads``: intra-op threads (0: one per core); ``config``: extra session config entries.
    ``exact_int4`` pins the MatMulNBits accuracy level: ORT fuses int4 DequantizeLinear +
    MatMul into MatMulNBits, whose default level quantizes activations to int8, so fidelity
    would measure ORT's kernel rather than the stored weights. Latency runs turn it off to time
    what a deployment gets.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(FATAL_ONLY)
    if provider not in PROVIDERS:
        raise UdfcError(f"unknown provider '{provider}' (choose cpu or cuda)")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise UdfcError(f"provider '{provider}' is not available in this onnxruntime "
                        "(install onnxruntime-gpu and a CUDA driver)")
    options = ort.SessionOptions()
    options.log_severity_level = FATAL_ONLY
    options.intra_op_num_threads = threads
    if exact_int4:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto) and io.approx_size(model) > io.PROTOBUF_LIMIT:
        # Protobuf cannot serialise it: ONNX Runtime reads it from a file with external data.
        with tempfile.TemporaryDirectory(prefix="udfc-session-") as folder:
            path = io.save_model(model, Path(folder) / "model.onnx", external_data=True)
            return session(path, provider, optimize, threads, config, exact_int4)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=[wanted])
    except Exception as exc:
        raise UdfcError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") \
            from None


def conv_channel_block() -> int:
    """The channel block of ONNX Runtime's CPU convolutions on this machine (``--round-to
    auto``). MLAS (onnxruntime/core/mlas/lib/platform.cpp) sets ``NchwcBlockSize`` to 8 on
    x86-64 and to 16 when AVX-512F is usable; the NCHWc layout transformer
    (core/optimizer/nchwc_transformer.cc) runs a Conv on its blocked kernels only when its
    output channels, and its input channels unless fewer than one block, are multiples of
    it; any other Conv falls back to im2col + SGEMM, whose time does not follow its FLOPs.
    Elsewhere (no NCHWc kernels) 8, what the SGEMM kernels' vector width favours."""
    import platform

    try:  # numpy's runtime CPU dispatch table (OS support checked), numpy 2 then 1
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 8
    return 16 if __cpu_features__.get("AVX512F") else 8


def refusals() -> tuple[type[Exception], ...]:
    """What a run raises when ONNX Runtime refuses a model or a feed it was not built for (a
    batch size baked into a Reshape, a wrong input type, ...): :func:`session` turns a load
    failure into a :class:`UdfcError`, and ``run`` raises ORT's own ``Fail``,
    ``InvalidArgument``, ``RuntimeException`` or ``NotImplemented``."""
    from onnxruntime.capi.onnxruntime_pybind11_state import (
        Fail,
        InvalidArgument,
        RuntimeException,
    )
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    return (UdfcError, Fail, InvalidArgument, RuntimeException, OrtNotImplemented)


def make_inputs(model: onnx.ModelProto, batch: int = 8, seed: int = 0,
                data: str | os.PathLike | None = None, limit: int | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs from a ``.npz`` (arrays named like the inputs, or a single array; optional
    ``labels``) or random normal ones of the model's static shape (dynamic dims -> ``batch``).
    ``input_shapes`` (``--input-shape``) fixes dynamic input shapes; ``limit``: at most this
    many samples of the data."""
    if limit is not None and limit < 1:
        raise UdfcError(f"--limit must be at least 1, got {limit}")
    inputs = graph_inputs(model)
    dims = input_dims(model, input_shapes)
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise UdfcError(f"{path}: data file not found")
        try:
            npz = np.load(path)
        except Exception as exc:
            raise UdfcError(f"{path}: not a readable .npz file ({exc})") from None
        labels = npz["labels"] if "labels" in npz.files else None
        arrays = {k: npz[k] for k in npz.files if k not in ("labels", "labels_all")}
        feed = {}
        for inp in inputs:
            if inp.name in arrays:
                feed[inp.name] = arrays[inp.name]
            elif len(inputs) == 1 and len(arrays) == 1:
                feed[inp.name] = next(iter(arrays.values()))
            else:
                raise UdfcError(f"{path}: no array named '{inp.name}' for the model's input")
        check_feed(model, feed, str(path), input_shapes)
        for name, arr in feed.items():
            feed[name] = arr[:limit].astype(np.float32) if limit else arr.astype(np.float32)
        if labels is not None and limit:
            labels = labels[:limit]
        return feed, labels
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in inputs:
        shape = [batch if d is None else d for d in dims[inp.name]]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed, None


def input_dims(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
               ) -> dict[str, list[int | None]]:
    """Per model input its dims (None where dynamic), ``input_shapes`` filled in after
    :func:`~onnx_udfc.core.io.check_input_shapes` accepted them."""
    check_input_shapes(model, input_shapes or {})
    dims = {inp.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in inp.type.tensor_type.shape.dim] for inp in graph_inputs(model)}
    for name, shape in (input_shapes or {}).items():
        dims[name] = [int(d) for d in shape]
    return dims


def check_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray], origin: str,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Each array matches its input: a float dtype, the rank, every static dim but the batch
    (a model may hard-code batch 1 while the data holds many samples), finite values."""
    dims = input_dims(model, input_shapes)
    for name in dims:
        if name not in feed:
            raise UdfcError(f"{origin}: no array named '{name}' for the model's input")
    for name, arr in feed.items():
        if name not in dims:
            raise UdfcError(f"{origin}: array '{name}' is not an input of the model")
        arr = np.asarray(arr)
        expected = "x".join("?" if d is None else str(d) for d in dims[name])
        if arr.ndim != len(dims[name]) or not np.issubdtype(arr.dtype, np.floating) or any(
                d is not None and d != n
                for d, n in zip(dims[name][1:], arr.shape[1:], strict=False)):
            raise UdfcError(f"{origin}: array for '{name}' has shape {arr.shape} and dtype "
                            f"{arr.dtype}; expected a preprocessed float array of shape "
                            f"{expected}")
        if not np.isfinite(arr).all():
            raise UdfcError(f"{origin}: array for '{name}' holds NaN or Inf values")


def typed_feed(sess, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` with every float array in the float type its input of ``sess`` takes: data and
    synthetic samples are float32, a float16 model takes float16. Every run of a model on
    data or samples goes through here (:func:`run`, the moments, ``--sequential``)."""
    wanted = {i.name: _ORT_TYPES.get(i.type) for i in sess.get_inputs()}
    typed = {}
    for name, arr in feed.items():
        dtype = wanted.get(name)
        cast = dtype is not None and np.issubdtype(dtype, np.floating) and \
            np.issubdtype(arr.dtype, np.floating)
        typed[name] = arr.astype(dtype, copy=False) if cast else arr
    return typed


def run(sess, feed: dict[str, np.ndarray], batch: int = 64,
        constants: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run in chunks of ``batch`` along the first axis when the model's batch is dynamic, and
    in chunks of the model's own batch when every input fixes the same one (exports that
    hard-code batch 1) and the feed holds a multiple of it. A graph that declares a dynamic
    batch but bakes batch 1 into a Reshape refuses the batch: then one sample at a time.
    ``constants`` (weights fed as inputs) go whole into every chunk. A feed ONNX Runtime still
    refuses is a :class:`UdfcError` naming the cause."""
    feed = typed_feed(sess, feed)
    whole = typed_feed(sess, constants or {})
    n = len(next(iter(feed.values())))
    firsts = {i.shape[0] if i.shape and isinstance(i.shape[0], int) else None
              for i in sess.get_inputs() if i.name not in whole}
    if firsts == {None}:
        batch = min(batch, n)
    elif len(firsts) == 1 and (size := firsts.pop()) and n > size and n % size == 0 \
            and all(len(v) == n for v in feed.values()):
        batch = size
    else:
        batch = n
    try:
        return _chunked(sess, feed, n, batch, whole)
    except refusals() as exc:
        if batch == 1 or firsts != {None}:
            raise UdfcError(f"ONNX Runtime cannot run the model on inputs of shape "
                            f"{_shapes(feed)}: {str(exc).splitlines()[0][:300]}") from None
    try:
        return _chunked(sess, feed, n, 1, whole)
    except refusals() as exc:
        raise UdfcError(f"ONNX Runtime cannot run the model on inputs of shape "
                        f"{_shapes(feed)}, even one sample at a time: "
                        f"{str(exc).splitlines()[0][:300]}") from None


def _chunked(sess, feed: dict[str, np.ndarray], n: int, batch: int,
             whole: dict[str, np.ndarray]) -> list[np.ndarray]:
    if batch >= n:
        return sess.run(None, {**whole, **feed})
    parts = [sess.run(None, {**whole, **{k: v[s:s + batch] if len(v) == n else v
                                         for k, v in feed.items()}})
             for s in range(0, n, batch)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in feed.items())
