"""Uniform integer grids, symmetric and asymmetric, 2 to 8 bits (the whitepaper's affine quantizer).

Asymmetric: w ~ scale * (q - zero), q in [0, 2^b - 1], integer zero point in the same range,
stored packed at b bits. The range always includes 0 (as in the GPTQ reference), so zero fits.
Symmetric: w ~ scale * (q - 2^(b-1)), scale = 2 * absmax / (2^b - 1) (the GPTQ convention: the
extra negative level is used and only the largest positive value may clip by half a step).
Scales are fp16.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Grid, ParamField, Params, round_to_fp16


class IntGrid(Grid):
    def __init__(self, bits: int, symmetric: bool = False) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"integer grids have 2 to 8 bits, got {bits}")
        self.bits = bits
        self.symmetric = symmetric
        self.maxq = 2**bits - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        if self.symmetric:
            return (ParamField.fp16("scale"),)
        return (ParamField.fp16("scale"), ParamField.code("zero", self.bits))

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "symmetric": self.symmetric}

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        if self.symmetric:
            absmax = w.abs().amax(dim=1, keepdim=True)
            scale = round_to_fp16(torch.where(absmax > 0, 2 * absmax / self.maxq, 1.0))
            return {"scale": scale}
        lo = w.amin(dim=1, keepdim=True).clamp(max=0)
        hi = w.amax(dim=1, keepdim=True).clamp(min=0)
        span = hi - lo
        scale = round_to_fp16(torch.where(span > 0, span / self.maxq, 1.0))
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return {"scale": scale, "zero": zero}

    def _zero(self, params: Params) -> torch.Tensor | float:
        return float(2 ** (self.bits - 1)) if self.symmetric else params["zero"]

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        q = torch.round(w.float() / params["scale"]) + self._zero(params)
        return q.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (codes.float() - self._zero(params)) * params["scale"]
