"""Run original and compressed models in ONNX Runtime and measure how close they are."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.ort import make_inputs, run, session
from onnx_udfc.report.fidelity import drift


@dataclass
class Fidelity:
    output: str
    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None
    channel_error: float = 0.0  # worst channel's RMS error over its spread (report.fidelity)
    channel_error_mean: float = 0.0
    worst_channel: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray],
            names: list[str]) -> list[Fidelity]:
    """Per output: max/mean absolute error, cosine similarity, top-1 agreement (classifiers)
    and the per-channel error of :mod:`onnx_udfc.report.fidelity`."""
    result = []
    for name, a, b in zip(names, reference, candidate, strict=True):
        a64, b64 = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        diff = np.abs(a64 - b64)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        top1 = None
        if a.ndim == 2 and a.shape[1] > 1:
            top1 = float((a.argmax(1) == b.argmax(1)).mean())
        worst = drift(a, b)
        result.append(Fidelity(name, float(diff.max(initial=0.0)), float(diff.mean())
                               if diff.size else 0.0, cosine, top1, worst.error,
                               worst.mean_error, worst.worst_channel))
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
           limit: int | None = None,
           input_shapes: dict[str, list[int]] | None = None,
           feed: dict[str, np.ndarray] | None = None) -> VerifyResult:
    """Compare two models on the same inputs; accuracy too when the data has labels.
    ``input_shapes`` fix the dynamic dims of generated inputs (``--input-shape``); ``feed``
    gives the inputs directly (the fidelity guard's synthetic images)."""
    labels = None
    if feed is None:
        ref_model = original if isinstance(original, onnx.ModelProto) else \
            onnx.load(str(original), load_external_data=False)
        feed, labels = make_inputs(ref_model, batch=batch, data=data, limit=limit,
                                   input_shapes=input_shapes)
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
