"""Run original and compressed models in ONNX Runtime and measure how close they are."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_udfc.errors import UdfcError
from onnx_udfc.io import graph_inputs

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
              "tensor(bool)": np.bool_}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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

    if provider not in PROVIDERS:
        raise UdfcError(f"unknown provider '{provider}' (choose cpu or cuda)")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise UdfcError(f"provider '{provider}' is not available in this onnxruntime "
                        "(install onnxruntime-gpu and a CUDA driver)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if exact_int4:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=[wanted])
    except Exception as exc:
        raise UdfcError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") \
            from None


def make_inputs(model: onnx.ModelProto, batch: int = 8, seed: int = 0,
                data: str | os.PathLike | None = None,
                limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs from a ``.npz`` (arrays named like the inputs, or a single array; optional
    ``labels``) or random normal ones of the model's static shape (dynamic dims -> ``batch``)."""
    inputs = graph_inputs(model)
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
        for name, arr in feed.items():
            rank = len(next(i for i in inputs if i.name == name).type.tensor_type.shape.dim)
            if arr.ndim != rank or not np.issubdtype(arr.dtype, np.floating):
                raise UdfcError(f"{path}: array for '{name}' has shape {arr.shape} and dtype "
                                f"{arr.dtype}; expected a preprocessed float array of rank {rank}")
            feed[name] = arr[:limit].astype(np.float32) if limit else arr.astype(np.float32)
        if labels is not None and limit:
            labels = labels[:limit]
        return feed, labels
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in inputs:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[inp.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feed, None


def run(sess, feed: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Run in chunks of ``batch`` along the first axis (when the model's batch is dynamic)."""
    n = len(next(iter(feed.values())))
    dynamic = all(not isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape)
    if not dynamic or n <= batch:
        return sess.run(None, feed)
    parts = [sess.run(None, {k: v[s:s + batch] for k, v in feed.items()})
             for s in range(0, n, batch)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


@dataclass
class Fidelity:
    output: str
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray],
            names: list[str]) -> list[Fidelity]:
    """Per output: max/mean absolute error, cosine similarity, top-1 agreement (classifiers)."""
    result = []
    for name, a, b in zip(names, reference, candidate, strict=True):
        a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        diff = np.abs(a64 - b64)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        top1 = None
        if a.ndim == 2 and a.shape[1] > 1:
            top1 = float((a.argmax(1) == b.argmax(1)).mean())
        result.append(Fidelity(name, float(diff.max(initial=0.0)), float(diff.mean())
                               if diff.size else 0.0, cosine, top1))
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.reshape(len(labels), -1).argmax(1) == labels).mean())


def latency(sess, feed: dict[str, np.ndarray], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``run`` in seconds."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class VerifyResult:
    fidelity: list[Fidelity]
    accuracy_before: float | None
    accuracy_after: float | None
    samples: int
    provider: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fidelity"] = [f.to_dict() for f in self.fidelity]
        return d


def verify(original: onnx.ModelProto | str, compressed: onnx.ModelProto | str, *,
           data: str | os.PathLike | None = None, batch: int = 8, provider: str = "cpu",
           limit: int | None = None) -> VerifyResult:
    """Compare two models on the same inputs; accuracy too when the data has labels."""
    ref_model = original if isinstance(original, onnx.ModelProto) else \
        onnx.load(str(original), load_external_data=False)
    feed, labels = make_inputs(ref_model, batch=batch, data=data, limit=limit)
    sa, sb = session(original, provider), session(compressed, provider)
    names = [o.name for o in sa.get_outputs()]
    if names != [o.name for o in sb.get_outputs()]:
        raise UdfcError("the two models have different outputs")
    out_a, out_b = run(sa, feed), run(sb, feed)
    acc_a = acc_b = None
    if labels is not None:
        acc_a, acc_b = accuracy(out_a[0], labels), accuracy(out_b[0], labels)
    return VerifyResult(compare(out_a, out_b, names), acc_a, acc_b,
                        len(next(iter(feed.values()))), provider)
