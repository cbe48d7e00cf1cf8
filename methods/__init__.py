"""Compression methods with real compressed storage, behind one registry."""

from methods import keep, rtn  # noqa: F401  (registers the built-in methods)
from methods.base import Cost, LayerShape, Method, Observer, Option
from methods.errors import OptionError
from methods.keep import KeepOption
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import get_method, method_of, option_from_dict, register, registered_methods
from methods.rtn import QuantOption

__all__ = [
    "Cost",
    "KeepOption",
    "LayerShape",
    "Method",
    "Observer",
    "Option",
    "OptionError",
    "QuantOption",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "get_method",
    "method_of",
    "option_from_dict",
    "register",
    "registered_methods",
]
