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

# The default verdict: past either limit the model is called likely broken. Measured on the
# shared CIFAR ResNets (tools/bench_guard.py, docs/results/guard.md): on their real images
# every plan that lost more than 10 points of top-1 drifted by > 0.8, every plan within 7
# points by < 0.62. Synthetic (pink-noise) inputs are off the training distribution: errors
# there run 2-10x higher and do not separate across models (a fine ResNet-56 plan reads 2.6,
# a broken BN-folded ResNet-20 plan 1.8), so the data-free limit only catches gross damage.
BROKEN_ERROR = {"data": 0.7, "synthetic": 3.0}
# Classifiers: the share of decisions kept. On synthetic inputs plans within 7 points kept
# >= 0.78 of them on the CIFAR ResNets and 0.69 on the digits CNN; the worst broken < 0.1.
BROKEN_AGREEMENT = {"data": 0.8, "synthetic": 0.5}
SPREAD_FLOOR = 1e-3  # of the channel's own RMS: a constant channel's spread
MIN_VALUES = 8  # values per channel (samples x positions) to estimate its spread from


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis that holds an output's channels: 1 for ``[N, C, ...]`` and ``[N, K]``; for a
    rank-3 ``[N, A, B]`` the shorter of A and B (YOLO exports write ``[1, 84, 8400]``, others
    ``[1, 8400, 85]``: the short axis holds boxes and class scores). None for a vector."""
    if len(shape) < 2:
        return None
    if len(shape) == 3:
        return 1 if shape[1] <= shape[2] else 2
    return 1


def channel_errors(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per output channel: RMS of the difference over the channel's spread in ``reference``."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(candidate, np.float64)
    axis = channel_axis(a.shape)
    if axis is None:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
        axis = 0
    a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    b = np.moveaxis(b, axis, 0).reshape(a.shape[0], -1)
    if a.shape[1] == 0:
        return np.zeros(a.shape[0])
    rms_a = np.sqrt(np.mean(a ** 2, axis=1))
    if a.shape[1] < MIN_VALUES:  # too few values for a channel's own spread: the output's
        spread = np.full(a.shape[0], float(a.std()) + 1e-12)
    else:
        spread = np.maximum(np.maximum(a.std(axis=1), SPREAD_FLOOR * rms_a),
                            1e-6 * float(a.std()) + 1e-12)
    rms = np.sqrt(np.mean((b - a) ** 2, axis=1))
    return rms / spread


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
    return True, f"worst channel error {error:.3f} of its spread ({where})" + (
        f", top-1 agreement {100 * low:.1f} %" if low is not None else "")
