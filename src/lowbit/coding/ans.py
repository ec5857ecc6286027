"""Asymmetric numeral systems (ANS) coding of a tensor's codes under their own histogram, with
`constriction` (Bamler et al.; `constriction.stream.stack.AnsCoder`).

A quantized layer's codes are far from uniform: a min-max grid puts most weights near the middle
of each group's range, so 4-bit codes carry about 3.5 bits of information. Coding them with a
categorical model fitted to their histogram stores them within a fraction of a bit per thousand
symbols of that entropy; decoding gives the very same codes back. The model is the symbol counts,
stored with the stream (`alphabet` int32 values), and both sides build it the same way from them,
so the decode is exact and the bytes are deterministic.

This is a storage format: loading decodes every coded layer once (constriction decodes about
30-50 M symbols a second on one core), after which the layer is the packed layer it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LowbitError


class CodingError(LowbitError):
    pass


@dataclass(frozen=True)
class CodedSymbols:
    """An ANS stream of `n` symbols below `len(counts)`: `words` uint32, `counts` int32 (the model)."""

    words: np.ndarray
    counts: np.ndarray
    n: int

    @property
    def nbytes(self) -> int:
        """Everything stored: the stream and the model."""
        return 4 * self.words.size + 4 * self.counts.size


def _model(counts: np.ndarray):
    import constriction

    total = counts.sum(dtype=np.int64)
    return constriction.stream.model.Categorical(counts.astype(np.float64) / float(total), perfect=False)


def encode_symbols(symbols: np.ndarray, alphabet: int) -> CodedSymbols:
    """Code `symbols` (integers in [0, alphabet)) under their own histogram."""
    import constriction

    flat = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if flat.size == 0:
        raise CodingError("nothing to code: no symbols")
    if int(flat.min()) < 0 or int(flat.max()) >= alphabet:
        raise CodingError(f"a symbol lies outside [0, {alphabet})")
    counts = np.bincount(flat, minlength=alphabet).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat, _model(counts))
    return CodedSymbols(coder.get_compressed().astype(np.uint32), counts, int(flat.size))


def decode_symbols(coded: CodedSymbols) -> np.ndarray:
    """The `coded.n` symbols, int32, exactly as encoded; a CodingError if the stream does not hold them."""
    import constriction

    counts = np.asarray(coded.counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2 or int(counts.min()) < 0 or int(counts.sum()) != coded.n:
        raise CodingError(f"the symbol counts do not describe {coded.n} symbols")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(coded.words, dtype=np.uint32))
    out = np.asarray(coder.decode(_model(counts.astype(np.int32)), coded.n), dtype=np.int32)
    if not coder.is_empty() or not np.array_equal(np.bincount(out, minlength=counts.size), counts):
        raise CodingError("the coded stream does not decode to the symbols its counts describe (corrupt data)")
    return out


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    """The empirical entropy of `symbols`, in bits per symbol (what ideal coding approaches)."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
