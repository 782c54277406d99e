"""How far a compressed model's outputs drift from the original's, in terms that match what each
output means, and the guard that decides whether a model is likely broken.

A whole-output error hides what matters: a detector's box coordinates are hundreds of pixels
while its class scores are below one, so cosine similarity stays at 0.99 while every score is
destroyed. Here every output *channel* (a class, a box coordinate, a feature map) is measured
against its own spread in the original: ``rms(after - before) / spread``, where the spread is
the channel's standard deviation over samples and positions (at least 0.1 % of its own RMS,
so that a constant channel cannot blow up on a rounding error; never a share of the whole
output's spread, which would hide small score rows behind large coordinates again). The worst
channel decides. Classifier logits also get top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_udfc.core.drift import channel_axis, channel_errors

__all__ = ["channel_axis", "channel_errors", "drift", "verdict", "default_limit"]

# The default verdict: past either limit the model is called likely broken. Measured on the
# shared CIFAR ResNets (tools/bench_guard.py, docs/results/guard.md): on their real images
# every plan that lost more than 10 points of top-1 drifted by > 0.8, every plan within 7
# points by < 0.62. Synthetic (pink-noise) inputs are off the training distribution: errors
# there run 2-10x higher and do not separate across models (a fine ResNet-56 plan reads 2.6,
# a broken BN-folded ResNet-20 plan 1.8), so the data-free limit only catches gross damage.
# The built-in photographs (onnx_udfc.moments.proxy, for image inputs) read the same way.
BROKEN_ERROR = {"data": 0.7, "synthetic": 3.0, "photos": 3.0}
# Classifiers: the share of decisions kept. On synthetic inputs plans within 7 points kept
# >= 0.78 of them on the CIFAR ResNets and 0.69 on the digits CNN; the worst broken < 0.1.
BROKEN_AGREEMENT = {"data": 0.8, "synthetic": 0.5, "photos": 0.5}
# Dense outputs (not classifier logits): the lowest per-channel correlation with the original,
# on the photographs. A channel that collapsed (a detector's objectness) reads ~0 where its
# error in spread units stays near 1-2. On the ddddocr detector the plans that kept their
# boxes read >= 0.98 and those that lost them all <= 0.47. int4, which keeps 46 % of them,
# reads 0.90, while PP-OCRv4's text detector at int8 (its text masks 99.5 % the same) reads
# 0.94 on the photographs (they hold little text): no limit separates those two, and the
# default preset must not be called broken, so the limit only catches collapse. On pink noise
# (tools/bench_guard_realworld.py, docs/results/guard_realworld.md) the repaired pruned
# detector, whose boxes are gone while its error stays at 2.7-3.0 of the spread (under the
# limit 3), reads 0.01-0.06, PP-OCRv4's pruned text detector about 0; every deployed row
# within 2 task points reads >= 0.91, within 3 points >= 0.46 (PP-OCRv4 under --budget-size
# 0.2, 2.2 points), so the noise limit sits well below both.
BROKEN_CORRELATION = {"photos": 0.6, "synthetic": 0.2}
@dataclass
class Drift:
    """The worst channel of one output."""

    error: float  # worst channel's error over its spread
    mean_error: float
    worst_channel: int | None


def drift(reference: np.ndarray, candidate: np.ndarray) -> Drift:
    errors = channel_errors(reference, candidate)
    if not errors.size:
        return Drift(0.0, 0.0, None)
    if not np.all(np.isfinite(errors)):
        return Drift(float("inf"), float("inf"), int(np.argmax(~np.isfinite(errors))))
    worst = int(np.argmax(errors))
    return Drift(float(errors[worst]), float(errors.mean()), worst)


def default_limit(inputs: str) -> float:
    """The channel-error limit past which a model is called likely broken, by input source."""
    return BROKEN_ERROR[inputs]


def verdict(fidelity: list[dict], limit: float, inputs: str | None = None
            ) -> tuple[bool, str]:
    """(holds, one plain sentence): every output's worst channel must stay within ``limit``
    and, when ``inputs`` names the source (the default verdict), classifiers must keep
    :data:`BROKEN_AGREEMENT` of their decisions."""
    worst = max(fidelity, key=lambda f: f.get("channel_error", 0.0), default=None)
    if worst is None:
        return True, "no outputs to compare"
    agreement = [f["top1_agreement"] for f in fidelity if f.get("top1_agreement") is not None]
    low = min(agreement) if agreement else None
    error = worst.get("channel_error", 0.0)
    where = f"output '{worst['output']}'" + (
        f" channel {worst['worst_channel']}" if worst.get("worst_channel") is not None else "")
    if error > limit:
        return False, (f"{where} drifts by {error:.2f} of its own spread "
                       f"(limit {limit:g})")
    if inputs is not None and low is not None and low < BROKEN_AGREEMENT[inputs]:
        return False, f"top-1 agreement with the original is {100 * low:.1f} %"
    # Classifiers are judged by their decisions; a [N, K] output has N values per channel,
    # too few for a stable correlation on out-of-domain photographs.
    corr = [(f["channel_correlation"], f["output"]) for f in fidelity
            if f.get("channel_correlation") is not None and f.get("top1_agreement") is None]
    if inputs in BROKEN_CORRELATION and corr and min(corr)[0] < BROKEN_CORRELATION[inputs]:
        value, output = min(corr)
        return False, (f"output '{output}' has a channel whose correlation with the original "
                       f"fell to {value:.2f} (limit {BROKEN_CORRELATION[inputs]:g})")
    return True, f"worst channel error {error:.3f} of its spread ({where})" + (
        f", top-1 agreement {100 * low:.1f} %" if low is not None else "")
