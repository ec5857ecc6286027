"""Entropy coding of integer symbols (stored codes), exact and deterministic."""

from .ans import CodedSymbols, CodingError, decode_symbols, encode_symbols, entropy_bits

__all__ = ["CodedSymbols", "CodingError", "decode_symbols", "encode_symbols", "entropy_bits"]
