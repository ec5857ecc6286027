"""Algorithms that choose codes for a weight on a grid: round-to-nearest and GPTQ."""

from .gptq import GPTQConfig, gptq_quantize
from .rtn import rtn_quantize

METHODS = ("rtn", "gptq")

__all__ = ["GPTQConfig", "METHODS", "gptq_quantize", "rtn_quantize"]
