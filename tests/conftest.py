from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ROOT

SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches ../shared (through the ``shared`` fixture) is marked ``shared``,
    so ``-m "not shared"`` runs without it."""
    for item in items:
        if "shared" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` beside the checkout (pretrained models and data; CI clones it there). The
    one way to reach it: without it, the tests that need it skip and say why."""
    if not (SHARED / "models" / "manifest.json").is_file():
        pytest.skip(f"needs the shared models and data at {SHARED} (clone them beside the "
                    "checkout)")
    return SHARED


@pytest.fixture(scope="session")
def shared_model(shared: Path) -> Callable[[str], Path]:
    """``shared_model("resnet20_cifar10_bn")``: the path of that model in ../shared/models."""
    return lambda name: shared / "models" / f"{name}.onnx"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return ROOT / "models" / "digits_cnn_bn.onnx"


@pytest.fixture(scope="session")
def digits_data() -> Path:
    """The digits model's test split: preprocessed ``images`` and ``labels``."""
    return ROOT / "models" / "digits_test.npz"
