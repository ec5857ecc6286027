"""Quantized KV caches for transformers' generate(): `kivi` (KIVI: keys per channel, values per
token, a full-precision residual window) and `eval` (KL of the next-token distributions on
positions decoded through the quantized cache)."""

from .eval import decoded_fidelity, kv_report
from .kivi import KIVICache, KIVILayer, kivi_bits_per_value

__all__ = ["KIVICache", "KIVILayer", "decoded_fidelity", "kivi_bits_per_value", "kv_report"]
