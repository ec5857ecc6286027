"""Randomized Hadamard rotation of a linear layer's input side (incoherence processing: QuIP#,
Tseng et al., 2024; QuaRot, Ashkboos et al., 2024).

For a layer y = W x, an orthogonal T gives y = (W T^T)(T x): quantize W' = W T^T and, at run time,
rotate the activations first. With T = H D / sqrt(b), D a random +-1 diagonal and H the b x b
Walsh-Hadamard matrix, every weight of a row is spread over b rotated ones and the Hessian's
outlier channels over b of them: the rows and the Hessian become incoherent, which is what lets a
uniform grid (and GPTQ) cope with outliers at 2-3 bits. T x costs one fast Walsh-Hadamard
transform, O(n log b) per token, with no matrix stored; the signs are stored with the layer
(n bits, counted in its size).

Widths that are not a power of two (SmolLM2: 576 = 9 x 64, 1536 = 3 x 512) are rotated in
independent blocks of b, the largest power of two dividing the width (capped at 2^14): T is then
block-diagonal, still orthogonal. An odd width has b = 1 and cannot be rotated (refused).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..errors import LowbitError

MAX_BLOCK = 1 << 14


class RotateError(LowbitError):
    pass


def hadamard_block(n: int) -> int:
    """The rotation block for width `n`: the largest power of two dividing it (at most MAX_BLOCK)."""
    if n <= 0:
        raise RotateError(f"width {n} cannot be rotated")
    return min(n & -n, MAX_BLOCK)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform of every `block` consecutive entries of the last dim
    of `x` ([..., n], n a multiple of block, block a power of two): H x / sqrt(block), O(n log block).
    Its own inverse."""
    n = x.shape[-1]
    if block & (block - 1) or n % block:
        raise RotateError(f"a Hadamard block of {block} does not tile width {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) * block**-0.5).to(x.dtype)


def layer_seed(name: str, seed: int) -> int:
    """A layer's sign seed: the recipe's seed and the layer's name (stable across runs and platforms)."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


@dataclass(frozen=True)
class HadamardRotation:
    """T = H D / sqrt(b) on the input side of one layer. `signs: [in]` +-1 (float32)."""

    signs: torch.Tensor
    block: int

    @classmethod
    def for_layer(cls, in_features: int, name: str, seed: int = 0) -> "HadamardRotation":
        block = hadamard_block(in_features)
        if block == 1:
            raise RotateError(f"{name}: width {in_features} is odd; a Hadamard rotation needs an even width "
                              "(keep this layer unrotated with a recipe override)")
        g = torch.Generator().manual_seed(layer_seed(name, seed))
        signs = torch.randint(0, 2, (in_features,), generator=g).float() * 2 - 1
        return cls(signs, block)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """T x for activations `x: [..., in]` (and for a weight's rows: W T^T row by row)."""
        return fwht(x * self.signs.to(x.dtype), self.block)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """T^T x: back to the original basis."""
        return fwht(x, self.block) * self.signs.to(x.dtype)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W T^T for `w: [out, in]` (each row rotated like an activation)."""
        return self.apply(w.float())

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """T H T^T for `h: [in, in]` or grouped `[groups, in, in]`: the rotated inputs' Hessian."""
        rows = self.apply(h.float())  # H T^T (H symmetric: each row rotated)
        return self.apply(rows.transpose(-1, -2).contiguous())  # (T H) T^T = T H T^T
