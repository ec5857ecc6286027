"""Runtime modules that hold packed quantized weights, one class per stored `kind`."""

from .act_linear import IntActLinear
from .base import MODULE_KINDS, QuantModule, module_from_entry
from .ptq161_linear import PTQ161Linear
from .pvq_linear import PVQLinear
from .quant_conv import QuantConv2d, StaticActLinear
from .quant_linear import QuantLinear
from .rotated_linear import RotatedQuantLinear
from .vq_linear import VQLinear

__all__ = ["IntActLinear", "MODULE_KINDS", "PTQ161Linear", "PVQLinear", "QuantConv2d", "QuantLinear", "QuantModule", "RotatedQuantLinear", "StaticActLinear", "VQLinear", "module_from_entry"]
