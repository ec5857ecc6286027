"""Uniform integer grids, symmetric and asymmetric, 2 to 8 bits (the whitepaper's affine quantizer).

Asymmetric: w ~ scale * (q - zero), q in [0, 2^b - 1], integer zero point in the same range,
stored packed at b bits. The range always includes 0 (as in the GPTQ reference), so zero fits.
Symmetric: w ~ scale * (q - 2^(b-1)), scale = -m / 2^(b-1) with m the block's weight of largest
magnitude, sign included (ggml's Q4_0 rule): m lands exactly on the extra level (code 0), and the
scale's sign puts that level on m's side. Only weights on the other side beyond (2^(b-1) - 1)
steps clip, by less than a step. Against the GPTQ convention (scale = 2 * absmax / (2^b - 1), the
extra level always negative) the step is 2^b / (2^b - 1) times finer and the outlier is exact: RTN
int4 g32 on SmolLM2-135M goes from KL 0.462 to 0.291 (llama.cpp's own Q4_0: 0.293).
Scales are fp16.

`int{b}_min` (IntMinGrid): unsigned codes with an fp16 step and an fp16 offset per block,
w ~ scale * q + min, q in [0, 2^b - 1]: llama.cpp's Q4_1 / Q5_1 decode. The asymmetric grid's
offset -zero * scale is generally not an fp16 number; this one's is, so a block stores exactly
what GGUF stores.
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
            m = w.gather(1, w.abs().argmax(dim=1, keepdim=True))  # [rows, 1]: largest magnitude, signed
            scale = round_to_fp16(torch.where(m != 0, -m / 2 ** (self.bits - 1), 1.0))
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


def round_to_fp16_signed(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest finite fp16 value (zero allowed) and return it as float32."""
    big = torch.finfo(torch.float16).max
    return x.clamp(-big, big).to(torch.float16).to(torch.float32)


class IntMinGrid(Grid):
    """w ~ scale * q + min, q in [0, 2^b - 1], fp16 scale and fp16 min per block (`int4_min`).

    Fit: min = fp16(min w), scale = fp16((max w - min) / (2^b - 1)) (1 for a constant block); the
    range need not contain 0. Decode multiplies, then adds, in float32 (two roundings in that
    order), as ggml's and gguf-py's Q4_1 / Q5_1 decoders do, so exported blocks decode to these
    values bit for bit.
    """

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"integer grids have 2 to 8 bits, got {bits}")
        self.bits = bits
        self.maxq = 2**bits - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}_min"

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"), ParamField.fp16("min"))

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        lo = round_to_fp16_signed(w.amin(dim=1, keepdim=True))
        span = w.amax(dim=1, keepdim=True) - lo
        scale = round_to_fp16(torch.where(span > 0, span / self.maxq, 1.0))
        return {"scale": scale, "min": lo}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        q = torch.round((w.float() - params["min"]) / params["scale"])
        return q.clamp(0, self.maxq).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return codes.float() * params["scale"] + params["min"]
