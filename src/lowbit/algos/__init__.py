"""Algorithms that choose codes for a weight: round-to-nearest, GPTQ, PTQ1.61, and the per-layer
format search that runs RTN or GPTQ over candidate grids; PTQ1.61's restorative LoRA, which
preprocesses a whole model before any of them; and the end-to-end tuning of scales and norms
after them (codes frozen)."""

from .e2e_tune import TuneConfig, TuneResult, tune_continuous
from .format_search import SearchResult, search_format
from .gptq import GPTQConfig, gptq_quantize, gptq_quantize_rounded, output_error
from .ptq161 import PTQ161Config, ptq161_quantize
from .restorative_lora import LoRALinear, RestorativeConfig, RestorativeResult, restorative_lora
from .rtn import rtn_quantize

METHODS = ("rtn", "gptq", "ptq161")

__all__ = [
    "GPTQConfig", "LoRALinear", "METHODS", "PTQ161Config", "RestorativeConfig", "RestorativeResult", "SearchResult",
    "TuneConfig", "TuneResult", "gptq_quantize", "gptq_quantize_rounded", "output_error", "ptq161_quantize", "restorative_lora", "rtn_quantize",
    "search_format", "tune_continuous",
]
