"""Evaluation data: ``.npz`` files, or scikit-learn's bundled digits for the embedded model.

The digits split and normalisation are those of ``tools/make_digits_model.py`` (recorded in
``models/digits_cnn_bn.json``): pixels / 16, stratified ``train_test_split`` with
test_size 0.25 and random_state 0, then ``(x - mean) / std`` with the training split's mean and
std. scikit-learn is an optional dependency (``pip install 'onnx-udfc[digits]'``).
"""

from __future__ import annotations

import numpy as np

from onnx_udfc.core.errors import UdfcError

DIGITS_TEST_SIZE = 0.25
DIGITS_SEED = 0
DIGITS_MEAN = 0.305224718123608
DIGITS_STD = 0.37600559619100277
DATASETS = ("digits",)


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits split, normalised as the embedded model expects (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UdfcError("--dataset digits needs scikit-learn "
                        "(pip install 'onnx-udfc[digits]'), or pass --data FILE.npz") from None
    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    _, x_test, _, y_test = train_test_split(x, y, test_size=DIGITS_TEST_SIZE,
                                            random_state=DIGITS_SEED, stratify=y)
    images = ((x_test - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)[:, None, :, :]
    return images, y_test


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        return digits_test_set()
    raise UdfcError(f"unknown dataset '{name}' (choose {', '.join(DATASETS)})")
