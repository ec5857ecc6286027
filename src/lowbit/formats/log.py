"""Logarithmic grids: powers of sqrt(2) (POST, from ASQ: "Precision Neural Network Quantization
via Learnable Adaptive Modules") and powers of two (log2 quantization, as in RepQuant: "Towards
Accurate Post-Training Quantization of Large Transformer Models via Scale Reparameterization").

`post{b}` / `log{b}` (3 to 8 bits): a sign bit and 2^(b-1) magnitudes, zero and
scale * 2^(-k * step) for k = 0 ... 2^(b-1) - 2, step 1/2 (POST) or 1 (log2). The scale is an
fp16 per block that maps the block's absmax onto the top level. Codes are sign-magnitude; a
negative value that rounds to zero keeps its sign (the -0 code), so +-0 share the zero level.
Encoding is nearest-level in the weight domain (a tie goes to the smaller magnitude).
"""

from __future__ import annotations

from typing import Any

import torch

from .lookup import SignMagnitudeGrid


class LogGrid(SignMagnitudeGrid):
    """Sign * scale * 2^(-k * step) plus zero; step 1/2 (`post`) or 1 (`log`)."""

    def __init__(self, bits: int, base: str = "log") -> None:
        if not 3 <= bits <= 8:
            raise ValueError(f"log grids have 3 to 8 bits, got {bits}")
        if base not in ("log", "post"):
            raise ValueError(f"log grid base is 'log' (powers of 2) or 'post' (powers of sqrt 2), got {base!r}")
        self.bits = bits
        self.base = base
        step = 0.5 if base == "post" else 1.0
        n = 2 ** (bits - 1)
        k = torch.arange(n - 2, -1, -1, dtype=torch.float64)  # smallest magnitude first
        self._set_mags(torch.cat([torch.zeros(1, dtype=torch.float64), torch.exp2(-k * step)]))

    @property
    def name(self) -> str:
        return f"{self.base}{self.bits}"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name}
