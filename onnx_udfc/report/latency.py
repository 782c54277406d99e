"""ONNX Runtime latency of several models, measured side by side.

Runs are interleaved (every round runs each model once, in a rotating order) so slow drifts of
the machine (frequency scaling, other processes, cache state) hit every model alike; the
reported figure is the median of the rounds. Used by ``onnx-udfc compress --latency`` and by
``tools/bench_latency.py``.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.ort import session


@dataclass
class Timing:
    """Per model: median, min and max wall seconds of one run over ``runs`` rounds, and the
    median CPU seconds of the process (all threads) per run. CPU time does not grow while the
    process waits for a core, so on a machine shared with other work it shows the model's own
    cost when wall time cannot (single-threaded sessions make the two comparable)."""

    median_s: float
    min_s: float
    max_s: float
    runs: int
    cpu_median_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu",
                    threads: int = 0, options: dict[str, str] | None = None):
    """A session as a deployment would open it: full graph optimisation, ``threads`` intra-op
    threads (0: ONNX Runtime's default, one per core), extra config entries in ``options``."""
    return session(model, provider, optimize=True, threads=threads, config=options,
                   exact_int4=False)


def random_feed(sess, batch: int, seed: int = 0,
                input_shapes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """Random float inputs with the session's shapes: dynamic sizes past the batch from
    ``input_shapes`` (the run's working shapes), the batch ``batch``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        sizes = (input_shapes or {}).get(inp.name)
        dims = [d if isinstance(d, int) else batch if axis == 0 or sizes is None else sizes[axis]
                for axis, d in enumerate(inp.shape)]
        if dims and isinstance(inp.shape[0], int) and inp.shape[0] != batch:
            raise UdfcError(f"input '{inp.name}' has a fixed batch of {inp.shape[0]}; "
                            f"cannot time batch {batch}")
        feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def interleaved(sessions: dict[str, Any], feed: dict[str, np.ndarray], runs: int = 20,
                warmup: int = 2, budget_s: float | None = None) -> dict[str, Timing]:
    """Median run time of every session on the same ``feed``, rounds interleaved.

    ``budget_s`` stops early (after at least 3 rounds) when the rounds so far already took
    that long, so large batches on slow machines stay bounded.
    """
    names = list(sessions)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t, c = time.perf_counter(), time.process_time()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {n: Timing(statistics.median(v), min(v), max(v), len(v),
                      statistics.median(cpu[n])) for n, v in times.items()}


# ONNX Runtime keeps weight DequantizeLinear nodes unfolded by default (they could belong to
# a QDQ group); with this entry it folds them into float constants once, at load time, and
# then fuses Conv + BatchNorm + Relu as for the float model.
FOLD_QDQ = {"session.disable_quant_qdq": "1"}


def compare_latency(before: onnx.ModelProto | str | os.PathLike,
                    after: onnx.ModelProto | str | os.PathLike, *, batch: int = 1,
                    runs: int = 20, provider: str = "cpu", threads: int = 0,
                    qdq: bool = False, input_shapes: dict[str, list[int]] | None = None
                    ) -> dict[str, Any]:
    """``{batch, provider, runs, before_ms, after_ms, ratio}`` for two models (the report's
    ``latency`` entry). ``qdq``: ``after`` stores integer weights; it is also timed with
    :data:`FOLD_QDQ` (``after_folded_ms``), the way to run it at float speed."""
    sessions = {"before": latency_session(before, provider, threads),
                "after": latency_session(after, provider, threads)}
    if qdq:
        sessions["folded"] = latency_session(after, provider, threads, FOLD_QDQ)
    feed = random_feed(sessions["before"], batch, input_shapes=input_shapes)
    t = interleaved(sessions, feed, runs=runs)
    before_ms, after_ms = 1e3 * t["before"].median_s, 1e3 * t["after"].median_s
    out = {"batch": batch, "provider": provider, "runs": t["before"].runs,
           "before_ms": before_ms, "after_ms": after_ms,
           "ratio": after_ms / before_ms if before_ms else None}
    if qdq:
        out["after_folded_ms"] = 1e3 * t["folded"].median_s
        out["session_options_folded"] = dict(FOLD_QDQ)
    return out
