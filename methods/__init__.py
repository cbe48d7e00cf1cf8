"""Compression methods with real compressed storage, behind one registry."""

# Importing a method's module registers it; one line per method.
from methods import (
    codebook,  # noqa: F401
    fp8,  # noqa: F401
    gguf,  # noqa: F401
    gptq,  # noqa: F401
    keep,  # noqa: F401
    lowrank,  # noqa: F401
    outliers,  # noqa: F401
    pruning,  # noqa: F401
    rtn,  # noqa: F401
    smoothquant,  # noqa: F401
)
from methods.base import Cost, LayerShape, Method, Observer, Option
from methods.errors import OptionError
from methods.gptq import GPTQOption
from methods.keep import KeepOption
from methods.quantized import QuantizedEmbedding, QuantizedLinear
from methods.registry import get_method, method_of, option_from_dict, register, registered_methods
from methods.rtn import QuantOption
from methods.smoothquant import W8A8Linear, W8A8Option

__all__ = [
    "Cost",
    "GPTQOption",
    "KeepOption",
    "LayerShape",
    "Method",
    "Observer",
    "Option",
    "OptionError",
    "QuantOption",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "W8A8Linear",
    "W8A8Option",
    "get_method",
    "method_of",
    "option_from_dict",
    "register",
    "registered_methods",
]
