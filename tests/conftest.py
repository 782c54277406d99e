from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` beside the checkout; its absence is a failure, not a skip."""
    if not (SHARED / "models" / "manifest.json").is_file():
        pytest.fail(f"shared reference material not found at {SHARED} (CI clones the project "
                    "with ../shared beside it)")
    return SHARED


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return ROOT / "models" / "digits_cnn_bn.onnx"
