"""The compression methods. Importing the package registers every one of them."""

from onnx_udfc.methods import closed_form, udfc_plus  # noqa: F401  (each registers itself)
from onnx_udfc.methods.base import REGISTRY, Method, get_method, register

__all__ = ["REGISTRY", "Method", "get_method", "register"]
