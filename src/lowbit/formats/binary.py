"""Binary (1-bit) sign grid: w ~ scale * sign(w), codes 0 (negative) and 1 (non-negative).

The scale of a block is mean |w|, the L2-optimal scale for sign quantization (XNOR-Net,
Rastegari et al., 2016; the scale BitNet uses), stored as fp16. -0.0 counts as negative, so
decode -> encode is exact. Zero is not representable: an all-zero block decodes to +-2^-14.
"""

from __future__ import annotations

import torch

from .base import Grid, ParamField, Params, round_to_fp16


class BinaryGrid(Grid):
    """sign(w) * mean|w| per block, 1 bit per weight plus an fp16 scale."""

    bits = 1

    @property
    def name(self) -> str:
        return "binary"

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"),)

    def fit(self, w: torch.Tensor) -> Params:
        # an all-zero block gets the smallest fp16 scale: 1 bit cannot represent 0
        return {"scale": round_to_fp16(w.float().abs().mean(dim=1, keepdim=True))}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return (~torch.signbit(w.float())).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (2 * codes.float() - 1) * params["scale"]
