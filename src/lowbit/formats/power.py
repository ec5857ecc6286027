"""Power-exponent grid from NUPES (Yvinec et al., 2023, "NUPES: Non-Uniform Post-Training
Quantization via Power Exponent Search").

Integer codes q stand for the levels sign(q) * |q / qmax|^alpha * scale: a power function
applied to a uniform symmetric integer grid. alpha > 1 packs the levels near zero (bell-shaped
weights), alpha = 1 is the uniform grid, alpha < 1 spreads them outwards. The default 1.25 had
the lowest RTN error on Gaussian blocks of 64 among alpha in [1, 1.75] at 4 bits (1.3 is
marginally better for blocks of 128 and at 3 bits); heavier tails want more (Student-t df=3: 1.75). b bits give
q in [-2^(b-1), 2^(b-1) - 1], qmax = 2^(b-1) - 1, code = q + 2^(b-1) (as the symmetric int grid;
the lone extra negative level -(2^(b-1) / qmax)^alpha * scale lies beyond -scale).

Scale (fp16 per block): the smallest that represents the block without clipping, i.e.
max(max w, -min w / (2^(b-1) / qmax)^alpha). Encoding is nearest-level in the weight domain
(not rounding in the transformed domain), which is what RTN and GPTQ assume; a tie goes to the
lower level.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Params, round_to_fp16
from .lookup import TableGrid


class PowerGrid(TableGrid):
    """NUPES power grid: levels sign(q)|q/qmax|^alpha * scale, integer codes q (offset)."""

    def __init__(self, bits: int, alpha: float = 1.25) -> None:
        if not 2 <= bits <= 8:
            raise ValueError(f"power grids have 2 to 8 bits, got {bits}")
        alpha = float(alpha)
        if not 0.25 <= alpha <= 8:
            raise ValueError(f"alpha must lie in [0.25, 8], got {alpha}")
        self.bits = bits
        self.alpha = alpha
        self.qmax = 2 ** (bits - 1) - 1
        q = torch.arange(-(2 ** (bits - 1)), self.qmax + 1, dtype=torch.float64)
        self._set_table(torch.sign(q) * (q.abs() / self.qmax) ** alpha)

    @property
    def name(self) -> str:
        return f"power{self.bits}"

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "alpha": self.alpha}

    def fit(self, w: torch.Tensor) -> Params:
        w = w.float()
        hi = w.amax(dim=1, keepdim=True).clamp(min=0)
        lo = w.amin(dim=1, keepdim=True).clamp(max=0)
        reach = -float(self.table[0])  # the extra negative level, in units of scale
        scale = torch.maximum(hi, -lo / reach)
        return {"scale": round_to_fp16(torch.where(scale > 0, scale, 1.0))}
