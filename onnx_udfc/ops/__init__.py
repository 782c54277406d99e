"""Everything known about an ONNX op type. Importing the package registers every rule."""

from onnx_udfc.ops import index, layers, layout  # noqa: F401  (each registers its rules)
from onnx_udfc.ops.base import RULES, Rule, register

__all__ = ["RULES", "Rule", "register"]
