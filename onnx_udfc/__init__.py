"""onnx-udfc: data-free structured pruning and quantization of ONNX models.

The pipeline is load -> analyse -> plan -> solve -> rewrite -> verify -> report; each stage is
usable on its own (see :mod:`onnx_udfc.api`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnx_udfc.core.errors import UdfcError  # noqa: E402

__all__ = ["UdfcError", "__version__"]
