"""Ternary (1.58-bit) grid from BitNet b1.58 (Ma et al., 2024, "The Era of 1-bit LLMs: All Large
Language Models are in 1.58 Bits") and "BitNet b1.58 Reloaded: State-of-the-art Performance Also on Smaller Networks" (2024).

w ~ scale * t, t in {-1, 0, +1}, t = clamp(round(w / scale), -1, 1), codes t + 1 in {0, 1, 2}.
The scale of a block is mean |w| (b1.58's absmean, `scale="absmean"`, default) or median |w|
(Reloaded's variant, `scale="median"`; the lower median for an even count, absmean where the
median is 0), stored as fp16; 1 for an all-zero block, which then decodes to exact zeros.

`ternary` packs 5 trits per byte (3^5 = 243 <= 256): byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4,
codes in row-major order, the last byte padded with zero trits; n codes take ceil(n / 5) bytes,
1.6 bits per weight. `ternary2` stores the same codes at plain 2 bits. `bits` is 2 for both
(the width of one code).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Grid, ParamField, Params, round_to_fp16

_POW3 = (1, 3, 9, 27, 81)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in {0, 1, 2} (any shape) -> flat bytes, 5 codes per byte."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 2:
        raise ValueError(f"a ternary code exceeds 2 (max {int(flat.max())})")
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    t = flat.reshape(-1, 5)
    # Horner's rule in uint8: every intermediate is at most 242
    return t[:, 0] + 3 * (t[:, 1] + 3 * (t[:, 2] + 3 * (t[:, 3] + 3 * t[:, 4])))


def unpack_trits(packed: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Inverse of `pack_trits`: the first `n_codes` codes as a flat uint8 tensor."""
    need = -(-n_codes // 5)
    if packed.numel() != need:
        raise ValueError(f"packed buffer has {packed.numel()} bytes, {n_codes} ternary codes need {need}")
    b = packed.reshape(-1).to(torch.uint8)
    if b.numel() and int(b.max()) > 242:
        raise ValueError(f"byte value {int(b.max())} is not 5 packed trits (at most 242): corrupt data")
    digits = []
    for _ in _POW3:  # five digits, each a whole-tensor op
        digits.append(b % 3)
        b = b // 3
    return torch.stack(digits, dim=1).reshape(-1)[:n_codes].contiguous()


class TernaryGrid(Grid):
    """BitNet b1.58 ternary grid {-1, 0, +1} * scale; absmean or median scale per block."""

    bits = 2

    def __init__(self, scale: str = "absmean", packed: bool = True) -> None:
        if scale not in ("absmean", "median"):
            raise ValueError(f"ternary scale is 'absmean' or 'median', got {scale!r}")
        self.scale_rule = scale
        self.packed = packed

    @property
    def name(self) -> str:
        return "ternary" if self.packed else "ternary2"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "scale": self.scale_rule}

    @property
    def param_fields(self) -> tuple[ParamField, ...]:
        return (ParamField.fp16("scale"),)

    def fit(self, w: torch.Tensor) -> Params:
        a = w.float().abs()
        s = mean = a.mean(dim=1, keepdim=True)
        if self.scale_rule == "median":  # a block that is mostly exact zeros falls back to absmean
            median = a.median(dim=1, keepdim=True).values
            s = torch.where(median > 0, median, mean)
        return {"scale": round_to_fp16(torch.where(s > 0, s, 1.0))}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return (torch.round(w.float() / params["scale"]).clamp(-1, 1) + 1).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return (codes.float() - 1) * params["scale"]

    def packed_nbytes(self, n_codes: int) -> int:
        return -(-n_codes // 5) if self.packed else super().packed_nbytes(n_codes)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_trits(codes) if self.packed else super().pack(codes)

    def unpack(self, packed: torch.Tensor, n_codes: int) -> torch.Tensor:
        return unpack_trits(packed, n_codes) if self.packed else super().unpack(packed, n_codes)
