"""IntActLinear (W8A8, W4A8, ...): integer weights and int8 activations, the product in integers.

The weight is an ordinary integer QuantLinear (2 to 8 bits, symmetric or asymmetric, any group
size): in group g of row o, W = s[o,g] * (U - Z[o,g]) with U, Z unsigned codes. At run time every
token's activations are quantized to int8 as well (dynamic, symmetric, per token:
s_t = max|x_t| / 127, the whitepaper's integer inference with per-row activation scales), so

    y[t,o] = s_t * sum_g s[o,g] * (Q_x[t,g] . (U[o,g] - c) - (Z[o,g] - c) * sum(Q_x[t,g]))  + b[o]

with c = 2^(bits-1) centring the codes into int8. Each group's dot product is an exact int32:
`torch._int_mm` (oneDNN's int8 GEMM, VNNI on x86) on the CPU. Elsewhere, or with `simulate=True`,
the same integers come from a float64 product (exact: |sum| < 2^53); both then go through the
same float32 operations, so the simulation and the kernel agree bit for bit. Nothing is stored
for the activations (their scales are computed per call); the artifact entry records how they are
quantized, so every reader runs the same arithmetic. One scale per row (group size -1) is one
integer product per layer; smaller groups cost one per group.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Grid, GroupLayout
from ..formats.int import IntGrid
from ..formats.ternary import TernaryGrid
from .base import register_kind
from .quant_linear import QuantLinear

#: how the activations are quantized (recorded in the artifact entry)
ACT_INT8_TOKEN = {"format": "int8", "symmetric": True, "granularity": "token", "calibration": "dynamic"}
_QMAX = 127.0  # symmetric: -127..127, so that -x quantizes to -q


def fits_int_act(grid: Grid) -> bool:
    """Whether a weight on `grid` can run in integers against int8 activations: integer grids of
    2 to 8 bits (their codes, centred, are int8), symmetric or asymmetric, any group size, and
    ternary (codes -1, 0, +1: BitNet b1.58's W1.58A8)."""
    return (type(grid) is IntGrid and 2 <= grid.bits <= 8) or isinstance(grid, TernaryGrid)


def _centre(grid: Grid) -> int:
    """What a stored code minus gives the signed integer level (ternary: 1; int: 2^(bits-1))."""
    return 1 if isinstance(grid, TernaryGrid) else 2 ** (grid.bits - 1)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [tokens, in] float -> (q: [tokens, in] float holding integers in [-127, 127], s: [tokens, 1])."""
    s = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(s > 0, s / _QMAX, torch.ones_like(s))
    return torch.round(x / s).clamp_(-_QMAX, _QMAX), s


@register_kind
class IntActLinear(QuantLinear):
    kind = "act-linear"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool) -> None:
        if not fits_int_act(grid):
            raise ValueError(f"int8 activations need an integer weight grid of 2 to 8 bits, not {grid.name}")
        super().__init__(grid, layout, bias)
        self.simulate = False  # True: the float64 product even where the int8 kernel runs
        self._int: dict[str, Any] | None = None

    def entry(self) -> dict[str, Any]:
        return {**super().entry(), "kind": self.kind, "act": dict(ACT_INT8_TOKEN)}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "IntActLinear":
        if entry.get("act") != ACT_INT8_TOKEN:
            raise ValueError(f"activation quantization {entry.get('act')!r} is not one this lowbit runs "
                             f"({ACT_INT8_TOKEN})")
        return cls(*cls._grid_layout(entry), entry["bias"])

    def _load_from_state_dict(self, *args, **kwargs):
        self._int = None  # new codes
        super()._load_from_state_dict(*args, **kwargs)

    def integer_weight(self) -> dict[str, Any]:
        """The weight as the integer product reads it, unpacked once and kept (1 byte per weight):
        `q_t` [in, out] int8 centred codes, `scale` [out, G] float32, `zero` [out, G] int32 centred
        zero points (None when symmetric), `bounds` the G column ranges."""
        if self._int is None:
            qw = self.quantized_weight()
            c = _centre(self.grid)
            q = (qw.codes.to(torch.int16) - c).to(torch.int8)  # [out, in]
            g = self.layout.effective_group_size
            bounds = [(a, min(a + g, self.in_features)) for a in range(0, self.in_features, g)]
            rows = lambda t: t.float().expand(self.out_features, len(bounds))  # noqa: E731 (per-tensor: one row)
            zero = None if getattr(self.grid, "symmetric", True) else (rows(qw.params["zero"]) - c).to(torch.int32).contiguous()
            self._int = {"q_t": q.t().contiguous(), "scale": rows(qw.params["scale"]).contiguous(), "zero": zero,
                         "bounds": bounds}
        return self._int

    @staticmethod
    def _group_product(q_x: torch.Tensor, q_t: torch.Tensor, zero: torch.Tensor | None, kernel: bool) -> torch.Tensor:
        """sum_k q_x[t,k] (q_t[k,o] - zero[o]) for one group, exact, as float32. The kernel works in
        int32 (|sum| <= 128 * 255 * in < 2^31); the simulation in float64 (exact below 2^53); the
        same integer then rounds to the same float32."""
        if kernel:
            acc = torch._int_mm(q_x.to(torch.int8), q_t)  # [tokens, out] int32
            if zero is not None:
                acc -= zero * q_x.sum(dim=1, keepdim=True).to(torch.int32)
        else:
            acc = q_x.double() @ q_t.double()
            if zero is not None:
                acc -= zero.double() * q_x.double().sum(dim=1, keepdim=True)
        return acc.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.integer_weight()
        shape = x.shape
        q_x, s_x = quantize_tokens(x.reshape(-1, self.in_features).float())
        kernel = x.device.type == "cpu" and not self.simulate
        q_t = w["q_t"] if kernel else w["q_t"].to(x.device)
        y = None
        for g, (a, b) in enumerate(w["bounds"]):
            zero = None if w["zero"] is None else w["zero"][:, g].to(x.device)
            part = self._group_product(q_x[:, a:b].contiguous(), q_t[a:b], zero, kernel)
            part *= w["scale"][:, g].to(x.device)
            y = part if y is None else y.add_(part)
        y *= s_x
        if self.bias is not None:
            y += self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act=int8 per token (dynamic)"
