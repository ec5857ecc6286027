"""Runtime modules that hold packed quantized weights."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
