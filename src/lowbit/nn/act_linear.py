"""Int8ActLinear (W8A8): int8 weights and int8 activations, the product in integers.

The weight is an ordinary symmetric int8 QuantLinear with one scale per output row (or one per
tensor): W = s_w * Q_w, Q_w in [-128, 127]. At run time every token's activations are quantized
to int8 as well (dynamic, symmetric, per token: s_t = max|x_t| / 127, the whitepaper's integer
inference with LLM.int8's per-row activation scales), so the layer is

    y_t = s_t * s_w * (Q_x[t] . Q_w^T) + b

and Q_x . Q_w^T is an exact int32 product: `torch._int_mm` (oneDNN's int8 GEMM, VNNI on x86) on
the CPU. Elsewhere, or with `simulate=True`, the same integers come from a float64 product (exact:
|sum| < 2^53), so the simulation and the kernel agree bit for bit. Nothing is stored for the
activations (their scales are computed per call); the artifact entry records how they are
quantized, so every reader runs the same arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Grid, GroupLayout
from ..formats.int import IntGrid
from .base import register_kind
from .quant_linear import QuantLinear

#: how the activations are quantized (recorded in the artifact entry)
ACT_INT8_TOKEN = {"format": "int8", "symmetric": True, "granularity": "token", "calibration": "dynamic"}
_QMAX = 127.0  # symmetric: -127..127, so that -x quantizes to -q


def fits_w8a8(grid: Grid, group_size: int) -> bool:
    """Whether a weight on `grid` with `group_size` can run in integers: symmetric int8 with one
    scale per row (-1) or per tensor (0); a scale per group would break the integer dot product."""
    return isinstance(grid, IntGrid) and grid.bits == 8 and grid.symmetric and group_size in (-1, 0)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [tokens, in] float -> (q: [tokens, in] float holding integers in [-127, 127], s: [tokens, 1])."""
    s = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(s > 0, s / _QMAX, torch.ones_like(s))
    return torch.round(x / s).clamp_(-_QMAX, _QMAX), s


@register_kind
class Int8ActLinear(QuantLinear):
    kind = "w8a8-linear"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool) -> None:
        if not fits_w8a8(grid, layout.group_size):
            raise ValueError(f"W8A8 needs symmetric int8 weights with one scale per row or per tensor, not "
                             f"{grid.name} {'symmetric' if getattr(grid, 'symmetric', False) else 'asymmetric'} "
                             f"with group size {layout.group_size}")
        super().__init__(grid, layout, bias)
        self.simulate = False  # True: the float64 product even where the int8 kernel runs
        self._int: tuple[torch.Tensor, torch.Tensor] | None = None

    def entry(self) -> dict[str, Any]:
        return {**super().entry(), "kind": self.kind, "act": dict(ACT_INT8_TOKEN)}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "Int8ActLinear":
        if entry.get("act") != ACT_INT8_TOKEN:
            raise ValueError(f"activation quantization {entry.get('act')!r} is not one this lowbit runs "
                             f"({ACT_INT8_TOKEN})")
        return cls(*cls._grid_layout(entry), entry["bias"])

    def _load_from_state_dict(self, *args, **kwargs):
        self._int = None  # new codes
        super()._load_from_state_dict(*args, **kwargs)

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_w^T: [in, out] int8, s_w: [out] float32), unpacked once and kept (1 byte per weight)."""
        if self._int is None:
            qw = self.quantized_weight()
            q = (qw.codes.to(torch.int16) - 2 ** (self.grid.bits - 1)).to(torch.int8)  # [out, in]
            scale = qw.params["scale"].reshape(-1).float().expand(self.out_features).contiguous()
            self._int = (q.t().contiguous(), scale)
        return self._int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_wt, s_w = self.integer_weight()
        shape = x.shape
        xs = x.reshape(-1, self.in_features).float()
        q_x, s_x = quantize_tokens(xs)
        if x.device.type == "cpu" and not self.simulate:
            acc = torch._int_mm(q_x.to(torch.int8), q_wt).float()  # [tokens, out], exact int32
        else:
            acc = (q_x.double() @ q_wt.to(x.device).double()).float()  # the same integers
        y = acc * s_x * s_w.to(x.device)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act=int8 per token (dynamic)"
