"""Run original and compressed models in ONNX Runtime and measure how close they are."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_udfc.core.drift import channel_correlations, squeeze_inner
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
    channel_correlation: float | None = None  # lowest per-channel correlation (core.drift)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray],
            names: list[str]) -> list[Fidelity]:
    """Per output: max/mean absolute error, cosine similarity, top-1 agreement (classifiers)
    and the per-channel error of :mod:`onnx_udfc.report.fidelity`."""
    result = []
    for name, a, b in zip(names, reference, candidate, strict=True):
        a64, b64 = _flat64(name, a, b)
        a, b = squeeze_inner(a), squeeze_inner(b)
        diff = np.abs(a64 - b64)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        top1 = float((a.argmax(1) == b.argmax(1)).mean()) if is_logits(a) else None
        worst = drift(a, b)
        corr = channel_correlations(a, b)
        result.append(Fidelity(name, float(diff.max(initial=0.0)), float(diff.mean())
                               if diff.size else 0.0, cosine, top1, worst.error,
                               worst.mean_error, worst.worst_channel,
                               float(corr.min()) if corr.size else None))
    return result


def _flat64(name: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise UdfcError(f"output '{name}' has shape {a.shape} in the original and {b.shape} "
                        "in the compressed model")
    return a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)


def is_logits(output: np.ndarray) -> bool:
    """Whether an output reads as classifier logits: ``[N, K]`` with ``K >= 2``."""
    return output.ndim == 2 and output.shape[1] >= 2


def accuracy(logits: np.ndarray, labels: np.ndarray, source: str = "the output") -> float:
    """Top-1 accuracy of classifier ``logits [N, K]`` against ``labels [N]``; anything else
    (a segmentation map, one score per sample) is refused, ``source`` naming it."""
    if not is_logits(logits):
        raise UdfcError(f"{source} has shape {list(logits.shape)}: top-1 accuracy needs "
                        "classifier logits [N, K] with K >= 2")
    if labels.shape != (len(logits),):
        raise UdfcError(f"the labels have shape {list(labels.shape)}; {source} needs one "
                        f"class index per sample ({len(logits)})")
    return float((logits.argmax(1) == labels).mean())


def mismatches(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str],
               fidelity: list[Fidelity], atol: float | None = None, rtol: float | None = None,
               min_agreement: float | None = None) -> list[str]:
    """One line per output outside the tolerances. As in Polygraphy and ``numpy.isclose``, a
    value passes when ``|compressed - original| <= atol + rtol * |original|`` (a tolerance not
    given counts as 0; NaN never passes); ``min_agreement`` is the least top-1 agreement of
    every classifier output."""
    failures = []
    if atol is not None or rtol is not None:
        at, rt = atol or 0.0, rtol or 0.0
        for name, a, b in zip(names, reference, candidate, strict=True):
            a64, b64 = _flat64(name, a, b)
            diff = np.abs(a64 - b64)
            bad = ~(diff <= at + rt * np.abs(a64))
            if bad.any():
                rel = np.divide(diff, np.abs(a64), out=np.full_like(diff, np.inf),
                                where=a64 != 0)
                failures.append(f"{name}: {int(bad.sum())} of {bad.size} values "
                                f"({100 * bad.mean():.2f}%) beyond atol {at:g} + rtol {rt:g}; "
                                f"max abs error {np.max(diff):.4g}, max rel error "
                                f"{np.max(rel[bad]):.4g}")
    if min_agreement is not None:
        scored = [f for f in fidelity if f.top1_agreement is not None]
        if not scored:
            raise UdfcError("--min-agreement needs a classifier output (logits [N, K] with "
                            "K >= 2)")
        failures += [f"{f.output}: top-1 agreement {100 * f.top1_agreement:.2f}% below "
                     f"{100 * min_agreement:.2f}%" for f in scored
                     if f.top1_agreement < min_agreement]
    return failures


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
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # what was fed
    failures: list[str] = field(default_factory=list)  # one line per output out of tolerance
    extra: dict[str, list[Fidelity]] = field(default_factory=dict)  # per extra feed

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fidelity"] = [f.to_dict() for f in self.fidelity]
        d["passed"] = self.passed
        return d


def verify(original: onnx.ModelProto | str, compressed: onnx.ModelProto | str, *,
           data: str | os.PathLike | None = None, batch: int = 8, provider: str = "cpu",
           limit: int | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
           atol: float | None = None, rtol: float | None = None,
           min_agreement: float | None = None,
           feed: dict[str, np.ndarray] | None = None,
           extra_feeds: Mapping[str, dict[str, np.ndarray]] | None = None) -> VerifyResult:
    """Compare two models on the same inputs; accuracy too when the data has labels and the
    first output is classifier logits. ``input_shapes`` fixes dynamic input shapes of the
    generated inputs; ``atol``/``rtol``/``min_agreement`` (see :func:`mismatches`) fill
    ``failures``; ``feed`` gives the inputs directly (the fidelity guard's synthetic images),
    ``extra_feeds`` more inputs compared by the same two sessions (``extra`` of the result)."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not value >= 0:
            raise UdfcError(f"{flag} must be a number >= 0, got {value}")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise UdfcError(f"--min-agreement must be a fraction in [0, 1], got {min_agreement}")
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
    if labels is not None and is_logits(out_a[0]):
        source = f"output '{names[0]}'"
        acc_a, acc_b = accuracy(out_a[0], labels, source), accuracy(out_b[0], labels, source)
    fidelity = compare(out_a, out_b, names)
    extra = {kind: compare(run(sa, more), run(sb, more), names)
             for kind, more in (extra_feeds or {}).items()}
    return VerifyResult(fidelity, acc_a, acc_b, len(next(iter(feed.values()))), provider,
                        {k: list(v.shape) for k, v in feed.items()},
                        mismatches(out_a, out_b, names, fidelity, atol, rtol, min_agreement),
                        extra)
