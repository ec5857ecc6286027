"""Pyramid vector quantization (`pvq{N}k{K}a{B}`): codebook-free vector codes on the L1 pyramid
(Fischer, 1986, "A pyramid vector quantizer"; for LLM weights: van der Ouderaa et al., 2024,
"Pyramid Vector Quantization for LLMs").

Every run of N consecutive weights of a row is stored as
- a direction: an integer point y on the pyramid S(N, K) = {y in Z^N : sum |y_i| = K} (K pulses),
  read as y / ||y||_2 on the unit sphere and stored as its enumeration index, ceil(log2 V(N, K))
  bits (V(N, K) = |S(N, K)|, counted exactly by the recurrence below); and
- an amplitude: a B-bit code a in [0, 2^B - 1], read as a * row_scale (one fp16 scale per row).

So W[i, N*j : N*(j+1)] = a[i, j] * scale[i] * y[i, j] / ||y[i, j]||_2. No codebook is stored: the
pyramid's points are enumerated, which is what lets N be 8 or 16 (a learned codebook of 2^25
16-dim vectors could not be stored, nor searched). pvq16k9a4 spends 27 + 4 bits per 16 weights.

The enumeration orders a point's coordinates left to right, each coordinate's values as 0, +1,
-1, +2, -2, ...: the index is the number of pyramid points that come before y in that order, so
encode and decode are exact inverses on every point of S(N, K) (tested exhaustively on small
pyramids). Indices are held in int64 (V(N, K) < 2^32 is enforced).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..pack import packed_nbytes

MAX_INDEX_BITS = 32
NAMED = {"pvq2": (16, 9, 4), "pvq3": (8, 10, 4)}  # ~2 and ~3 bits per weight
PATTERN = re.compile(r"pvq([1-9]|[1-5][0-9]|6[0-4])k([1-9][0-9]?)a([1-8])")


def pyramid_counts(n: int, k: int) -> list[list[int]]:
    """V[m][j] = |S(m, j)| for m <= n, j <= k: V(m, 0) = 1, V(0, j>0) = 0 and
    V(m, j) = V(m-1, j) + V(m, j-1) + V(m-1, j-1)."""
    v = [[1] + [0] * k for _ in range(n + 1)]
    for m in range(1, n + 1):
        for j in range(1, k + 1):
            v[m][j] = v[m - 1][j] + v[m][j - 1] + v[m - 1][j - 1]
    return v


@dataclass(frozen=True)
class PVQFormat:
    """N-dim pyramid directions with K pulses (`dim`, `pulses`), B-bit amplitudes (`amp_bits`),
    one fp16 amplitude scale per row."""

    dim: int
    pulses: int
    amp_bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.dim <= 64 or not 1 <= self.pulses <= 99 or not 1 <= self.amp_bits <= 8:
            raise ValueError(f"pvq{self.dim}k{self.pulses}a{self.amp_bits}: use 1-64 dimensions, 1-99 pulses, "
                             "1-8 amplitude bits")
        if self.count > 2**MAX_INDEX_BITS:
            raise ValueError(f"{self.name}: the pyramid has {self.count} points, more than {MAX_INDEX_BITS}-bit "
                             "indices hold; use fewer pulses or dimensions")

    @property
    def name(self) -> str:
        return f"pvq{self.dim}k{self.pulses}a{self.amp_bits}"

    @cached_property
    def _counts(self) -> list[list[int]]:
        return pyramid_counts(self.dim, self.pulses)

    @property
    def count(self) -> int:
        """V(N, K): points on the pyramid."""
        return self._counts[self.dim][self.pulses]

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.count)))

    @property
    def bits(self) -> float:
        """Bits per weight in codes (direction and amplitude)."""
        return (self.index_bits + self.amp_bits) / self.dim

    def spec(self) -> dict[str, Any]:
        return {"format": self.name}

    def check_width(self, in_features: int) -> None:
        if in_features % self.dim:
            raise ValueError(f"{self.name} cuts rows into vectors of {self.dim}, which do not tile width {in_features}")

    def storage_bytes(self, out_features: int, in_features: int) -> dict[str, int]:
        """Exact bytes stored for an [out, in] weight: packed indices, packed amplitudes, fp16 row scales."""
        self.check_width(in_features)
        n = out_features * in_features // self.dim
        return {"codes": packed_nbytes(n, self.index_bits), "amps": packed_nbytes(n, self.amp_bits),
                "scales": 2 * out_features}

    @cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [N+1, K+1], before [N+1, K+1, K+2]) as int64: before[m, k, a] counts the completions
        of an m-coordinate suffix holding k pulses whose first value has magnitude < a (value 0
        once, each +-j twice): V(m-1, k) + 2 * sum_{0<j<a} V(m-1, k-j)."""
        n, k = self.dim, self.pulses
        v = torch.tensor(self._counts, dtype=torch.int64)  # [N+1, K+1]
        before = torch.zeros(n + 1, k + 1, k + 2, dtype=torch.int64)
        for m in range(1, n + 1):
            for kk in range(k + 1):
                for a in range(1, kk + 2):
                    j = a - 1  # the magnitude counted in when a passes it
                    before[m, kk, a] = before[m, kk, a - 1] + (1 if j == 0 else 2) * int(v[m - 1, kk - j])
        return v, before

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Indices [n] int64 of pyramid points `y: [n, N]` (integers, sum |y| = K per row)."""
        v, before = self._tables
        y = y.to(torch.int64)
        if y.shape[-1] != self.dim or bool((y.abs().sum(1) != self.pulses).any()):
            raise ValueError(f"{self.name}: every point needs {self.dim} integer coordinates with |y|_1 = {self.pulses}")
        index = torch.zeros(y.shape[0], dtype=torch.int64)
        left = torch.full((y.shape[0],), self.pulses, dtype=torch.int64)  # pulses still to place
        for i in range(self.dim):
            m = self.dim - i
            a = y[:, i].abs()
            index += before[m, left, a]
            index += (y[:, i] < 0) * v[m - 1, left - a]  # +a comes before -a
            left -= a
        return index

    def decode(self, index: torch.Tensor) -> torch.Tensor:
        """Pyramid points [n, N] int64 of indices `index: [n]` (inverse of `encode`)."""
        v, before = self._tables
        r = index.to(torch.int64).clone()
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= self.count):
            raise ValueError(f"{self.name}: an index is outside [0, {self.count})")
        y = torch.zeros(r.shape[0], self.dim, dtype=torch.int64)
        left = torch.full_like(r, self.pulses)
        for i in range(self.dim):
            m = self.dim - i
            rows = before[m, left]  # [n, K+2]; entries past left + 1 are 0 and never chosen
            valid = torch.arange(self.pulses + 2) <= (left + 1)[:, None]
            a = ((rows <= r[:, None]) & valid).sum(1) - 1  # largest a with before <= r
            r -= before[m, left, a]
            pos_count = v[m - 1, left - a]
            neg = (a > 0) & (r >= pos_count)
            r -= neg * pos_count
            y[:, i] = torch.where(neg, -a, a)
            left -= a
        return y

    def directions(self, y: torch.Tensor) -> torch.Tensor:
        """Unit vectors y / ||y||_2 [n, N] float32 of pyramid points."""
        y = y.float()
        return y / y.norm(dim=1, keepdim=True)
