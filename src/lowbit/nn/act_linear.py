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
from .base import register_kind
from .quant_linear import QuantLinear

#: how the activations are quantized (recorded in the artifact entry)
ACT_INT8_TOKEN = {"format": "int8", "symmetric": True, "granularity": "token", "calibration": "dynamic"}
_QMAX = 127.0  # symmetric: -127..127, so that -x quantizes to -q


def fits_int_act(grid: Grid) -> bool:
    """Whether a weight on `grid` can run in integers against int8 activations: integer grids of
    2 to 8 bits (their codes, centred, are int8), symmetric or asymmetric, any group size."""
    return type(grid) is IntGrid and 2 <= grid.bits <= 8


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
        `q_t` [in, out] int8 centred codes, `scale` [out, G] float32, `zero` [out, G] int64 centred
        zero points (None when symmetric), `bounds` the G column ranges."""
        if self._int is None:
            qw = self.quantized_weight()
            c = 2 ** (self.grid.bits - 1)
            q = (qw.codes.to(torch.int16) - c).to(torch.int8)  # [out, in]
            g = self.layout.effective_group_size
            bounds = [(a, min(a + g, self.in_features)) for a in range(0, self.in_features, g)]
            rows = lambda t: t.float().expand(self.out_features, len(bounds))  # noqa: E731 (per-tensor: one row)
            zero = None if self.grid.symmetric else rows(qw.params["zero"]).to(torch.int64) - c
            self._int = {"q_t": q.t().contiguous(), "scale": rows(qw.params["scale"]).contiguous(), "zero": zero,
                         "bounds": bounds}
        return self._int

    def _dot(self, q_x: torch.Tensor, q_t: torch.Tensor, kernel: bool) -> torch.Tensor:
        """[tokens, k] x [k, out] integer product, exact, as int64."""
        if kernel:
            return torch._int_mm(q_x.to(torch.int8), q_t).to(torch.int64)
        return (q_x.double() @ q_t.double()).to(torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.integer_weight()
        shape = x.shape
        q_x, s_x = quantize_tokens(x.reshape(-1, self.in_features).float())
        kernel = x.device.type == "cpu" and not self.simulate
        q_t = w["q_t"] if kernel else w["q_t"].to(x.device)
        y = None
        for g, (a, b) in enumerate(w["bounds"]):
            acc = self._dot(q_x[:, a:b].contiguous(), q_t[a:b], kernel)  # [tokens, out]
            if w["zero"] is not None:
                acc = acc - w["zero"][:, g].to(acc.device) * q_x[:, a:b].sum(dim=1, keepdim=True).to(torch.int64)
            part = acc.float() * w["scale"][:, g].to(x.device)
            y = part if y is None else y + part
        y = y * s_x
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act=int8 per token (dynamic)"
