"""Algorithms that choose codes for a weight: round-to-nearest, GPTQ, PTQ1.61, and the per-layer
format search that runs RTN or GPTQ over candidate grids."""

from .format_search import SearchResult, output_error, search_format
from .gptq import GPTQConfig, gptq_quantize
from .ptq161 import PTQ161Config, ptq161_quantize
from .rtn import rtn_quantize

METHODS = ("rtn", "gptq", "ptq161")

__all__ = [
    "GPTQConfig", "METHODS", "PTQ161Config", "SearchResult", "gptq_quantize", "output_error", "ptq161_quantize",
    "rtn_quantize", "search_format",
]
